//! Elementwise kernels: casts bit-exact, arithmetic within one bf16 rounding.

use sgdm::memory::pool::Pool;
use sgdm::ops::elementwise;
use sgdm::{DType, Device, Tensor};

use crate::common::{compare, cpu, random, rounded, upload};

type Unary = fn(&Tensor, &mut Tensor) -> anyhow::Result<()>;
type Binary = fn(&Tensor, &Tensor, &mut Tensor) -> anyhow::Result<()>;

pub fn check(gpu: &Device) {
    let n = 10_007; // not a multiple of the block size
    let x = random(n, -6.0, 6.0, 1);
    let b = random(n, -2.0, 2.0, 2);
    // Room for four f32 tensors of n; each block's tensors go back to the pool as they drop.
    let pool = Pool::new(gpu, 4 * (n * 4).div_ceil(256) * 256).unwrap();

    // Tensor::fill_zero is a device memset of exactly the tensor's bytes.
    let mut before = pool.alloc(&[n], DType::F32).unwrap();
    let mut zeroed = pool.alloc(&[n], DType::BF16).unwrap();
    before.write_f32(&x).unwrap();
    zeroed.write_f32(&x).unwrap();
    zeroed.fill_zero().unwrap();
    assert!(zeroed.to_f32_vec().unwrap().iter().all(|v| *v == 0.0), "fill_zero left non-zero values");
    assert_eq!(before.to_f32_vec().unwrap(), x, "fill_zero wrote outside its tensor");
    drop((before, zeroed));

    // fill: every element, exactly (1/3 rounds once to bf16 on both sides), nothing outside the tensor.
    for dtype in [DType::F32, DType::BF16] {
        let mut t = pool.alloc(&[n], dtype).unwrap();
        let mut after = pool.alloc(&[n], DType::F32).unwrap();
        after.write_f32(&x).unwrap();
        elementwise::fill(&mut t, 1.0 / 3.0).unwrap();
        compare(&format!("fill {dtype}"), &t.to_f32_vec().unwrap(), &rounded(dtype, &vec![1.0 / 3.0; n]), 0.0, 0.0);
        assert_eq!(after.to_f32_vec().unwrap(), x, "fill wrote outside its tensor");
    }

    // Casts: CUDA and `half` both round to nearest even, so the bits agree exactly.
    for (from, to) in [
        (DType::F32, DType::BF16),
        (DType::BF16, DType::F32),
        (DType::F32, DType::F16),
        (DType::F16, DType::F32),
        (DType::BF16, DType::F16),
        (DType::F16, DType::BF16),
    ] {
        let mut src = pool.alloc(&[n], from).unwrap();
        src.write_f32(&x).unwrap();
        let mut dst = pool.alloc(&[n], to).unwrap();
        elementwise::cast(&src, &mut dst).unwrap();
        let mut want = Tensor::zeros(&Device::Cpu, &[n], to).unwrap();
        elementwise::cast(&src.to_device(&Device::Cpu, from).unwrap(), &mut want).unwrap();
        assert_eq!(dst.to_bytes().unwrap(), want.to_bytes().unwrap(), "cast {from} -> {to} is not bit-exact");
        println!("cast {from} -> {to}: bit-exact over {n} values");
    }

    // f32: only __expf differs from the CPU's exp (a few ulp). bf16: the inputs are the bf16-rounded values on
    // both sides; the output is rounded once to bf16, half an ulp = 2^-9 relative, 2^-8 leaves margin.
    for (dtype, rel, floor) in [(DType::F32, 1e-5, 1e-6), (DType::BF16, 2f32.powi(-8), 1e-6)] {
        let (xr, br) = (rounded(dtype, &x), rounded(dtype, &b));
        let mut gx = pool.alloc(&[n], dtype).unwrap();
        gx.write_f32(&xr).unwrap();
        let mut gb = pool.alloc(&[n], dtype).unwrap();
        gb.write_f32(&br).unwrap();
        let mut gy = pool.alloc(&[n], dtype).unwrap();
        let mut cy = cpu(&[n], &vec![0.0; n]);

        elementwise::add(&gx, &gb, &mut gy).unwrap();
        elementwise::add(&cpu(&[n], &xr), &cpu(&[n], &br), &mut cy).unwrap();
        compare(&format!("add {dtype}"), &gy.to_f32_vec().unwrap(), cy.f32s().unwrap(), rel, floor);

        elementwise::scale(&gx, 0.3, &mut gy).unwrap();
        elementwise::scale(&cpu(&[n], &xr), 0.3, &mut cy).unwrap();
        compare(&format!("scale {dtype}"), &gy.to_f32_vec().unwrap(), cy.f32s().unwrap(), rel, floor);

        elementwise::silu_forward(&gx, &mut gy).unwrap();
        elementwise::silu_forward(&cpu(&[n], &xr), &mut cy).unwrap();
        compare(&format!("silu_forward {dtype}"), &gy.to_f32_vec().unwrap(), cy.f32s().unwrap(), rel, floor);

        elementwise::silu_backward(&gx, &gb, &mut gy).unwrap();
        elementwise::silu_backward(&cpu(&[n], &xr), &cpu(&[n], &br), &mut cy).unwrap();
        compare(&format!("silu_backward {dtype}"), &gy.to_f32_vec().unwrap(), cy.f32s().unwrap(), rel, floor);
    }
    assert_eq!(pool.usage().live, 0, "every tensor went back to the pool");
    check_activations(gpu);
    check_products(gpu);
}

/// ReLU, GELU, GEGLU, sigmoid, the scaled residual add and the timestep embedding, forward and backward.
/// f32: the CPU's erfc fit and f32 exp against CUDA's normcdff/expf/sinf, a few 1e-6 relative, so 1e-5.
/// bf16: inputs are the bf16-rounded values on both sides and CUDA rounds its f32 result once: 2^-8 relative.
fn check_activations(gpu: &Device) {
    let (rows, half) = (3 * 77, 40); // odd row count, head-dim-like width
    let n = rows * 2 * half;
    let x = random(n, -6.0, 6.0, 101);
    let g = random(n, -1.0, 1.0, 102);
    let s = random(n, 0.0, 1.0, 103);
    let pool = Pool::new(gpu, 16 * n * 4 + (1 << 16)).unwrap();
    for (dtype, rel, floor) in [(DType::F32, 1e-5, 1e-6), (DType::BF16, 2f32.powi(-8), 1e-6)] {
        let (xr, gr, sr) = (rounded(dtype, &x), rounded(dtype, &g), rounded(dtype, &s));
        let gx = upload(&pool, &[n], dtype, &xr);
        let gg = upload(&pool, &[n], dtype, &gr);
        let gs = upload(&pool, &[n], dtype, &sr);
        let mut gy = pool.alloc(&[n], dtype).unwrap();
        let mut cy = cpu(&[n], &vec![0.0; n]);
        let unary: [(&str, Unary); 3] = [
            ("relu_forward", elementwise::relu_forward),
            ("gelu_forward", elementwise::gelu_forward),
            ("sigmoid_forward", elementwise::sigmoid_forward),
        ];
        for (name, op) in unary {
            op(&gx, &mut gy).unwrap();
            op(&cpu(&[n], &xr), &mut cy).unwrap();
            compare(&format!("{name} {dtype}"), &gy.to_f32_vec().unwrap(), cy.f32s().unwrap(), rel, floor);
        }
        let binary: [(&str, Binary, &Tensor, &[f32]); 3] = [
            ("relu_backward", elementwise::relu_backward, &gx, &xr),
            ("gelu_backward", elementwise::gelu_backward, &gx, &xr),
            ("sigmoid_backward", elementwise::sigmoid_backward, &gs, &sr),
        ];
        for (name, op, input, values) in binary {
            op(input, &gg, &mut gy).unwrap();
            op(&cpu(&[n], values), &cpu(&[n], &gr), &mut cy).unwrap();
            compare(&format!("{name} {dtype}"), &gy.to_f32_vec().unwrap(), cy.f32s().unwrap(), rel, floor);
        }

        elementwise::add_scaled(&gx, &gg, -0.3, &mut gy).unwrap();
        elementwise::add_scaled(&cpu(&[n], &xr), &cpu(&[n], &gr), -0.3, &mut cy).unwrap();
        compare(&format!("add_scaled {dtype}"), &gy.to_f32_vec().unwrap(), cy.f32s().unwrap(), rel, floor);
        let mut gdb = pool.alloc(&[n], dtype).unwrap();
        let mut cdb = cpu(&[n], &vec![0.0; n]);
        elementwise::add_scaled_backward(&gg, -0.3, &mut gy, &mut gdb).unwrap();
        elementwise::add_scaled_backward(&cpu(&[n], &gr), -0.3, &mut cy, &mut cdb).unwrap();
        compare(&format!("add_scaled_backward da {dtype}"), &gy.to_f32_vec().unwrap(), cy.f32s().unwrap(), rel, floor);
        compare(&format!("add_scaled_backward db {dtype}"), &gdb.to_f32_vec().unwrap(), cdb.f32s().unwrap(), rel, floor);

        // Reparameterisation with x as mu, g as logvar and the sigmoid outputs as eps: __expf differs from
        // the CPU's exp by a few ulp, within the same bounds.
        elementwise::reparameterize_forward(&gx, &gg, &gs, &mut gy).unwrap();
        elementwise::reparameterize_forward(&cpu(&[n], &xr), &cpu(&[n], &gr), &cpu(&[n], &sr), &mut cy).unwrap();
        compare(&format!("reparameterize_forward {dtype}"), &gy.to_f32_vec().unwrap(), cy.f32s().unwrap(), rel, floor);
        elementwise::reparameterize_backward(&gg, &gs, &gx, &mut gy, &mut gdb).unwrap();
        elementwise::reparameterize_backward(&cpu(&[n], &gr), &cpu(&[n], &sr), &cpu(&[n], &xr), &mut cy, &mut cdb).unwrap();
        compare(&format!("reparameterize_backward dmu {dtype}"), &gy.to_f32_vec().unwrap(), cy.f32s().unwrap(), rel, floor);
        compare(&format!("reparameterize_backward dlogvar {dtype}"), &gdb.to_f32_vec().unwrap(), cdb.f32s().unwrap(), rel, floor);

        // GEGLU: x [rows, 2 half] -> y [rows, half]; the backward writes both halves of dx.
        let gx2 = upload(&pool, &[rows, 2 * half], dtype, &xr);
        let gdy = upload(&pool, &[rows, half], dtype, &gr[..rows * half]);
        let mut gy2 = pool.alloc(&[rows, half], dtype).unwrap();
        let mut cy2 = cpu(&[rows, half], &vec![0.0; rows * half]);
        elementwise::geglu_forward(&gx2, &mut gy2).unwrap();
        elementwise::geglu_forward(&cpu(&[rows, 2 * half], &xr), &mut cy2).unwrap();
        compare(&format!("geglu_forward {dtype}"), &gy2.to_f32_vec().unwrap(), cy2.f32s().unwrap(), rel, floor);
        let mut gdx = pool.alloc(&[rows, 2 * half], dtype).unwrap();
        let mut cdx = cpu(&[rows, 2 * half], &vec![0.0; n]);
        elementwise::geglu_backward(&gx2, &gdy, &mut gdx).unwrap();
        elementwise::geglu_backward(&cpu(&[rows, 2 * half], &xr), &cpu(&[rows, half], &gr[..rows * half]), &mut cdx).unwrap();
        compare(&format!("geglu_backward {dtype}"), &gdx.to_f32_vec().unwrap(), cdx.f32s().unwrap(), rel, floor);

        // Timestep embedding: f32 timesteps up to 999. expf may differ from the CPU's exp by an ulp or two,
        // which moves the angle t * freq by up to ~2.4e-7 (t + 1) (as in tests/elementwise.rs); bf16 adds
        // half an ulp of |value| <= 1.
        let t = [0.0f32, 1.0, 17.0, 250.5, 999.0, 999.0, 3.0];
        let gt = upload(&pool, &[t.len()], DType::F32, &t);
        for (dim, flip, shift) in [(320usize, true, 0.0f32), (33, false, 1.0)] {
            let mut ge = pool.alloc(&[t.len(), dim], dtype).unwrap();
            let mut ce = cpu(&[t.len(), dim], &vec![0.0; t.len() * dim]);
            elementwise::timestep_embedding(&gt, flip, shift, &mut ge).unwrap();
            elementwise::timestep_embedding(&cpu(&[t.len()], &t), flip, shift, &mut ce).unwrap();
            let (got, want) = (ge.to_f32_vec().unwrap(), ce.f32s().unwrap().to_vec());
            let round = if dtype == DType::BF16 { 2f32.powi(-9) } else { 0.0 };
            for (r, &tr) in t.iter().enumerate() {
                let row = r * dim..(r + 1) * dim;
                compare(&format!("timestep_embedding {dim} t {tr} {dtype}"), &got[row.clone()], &want[row], round, 2.4e-7 * (tr + 1.0) + round);
            }
        }
    }
}

/// tanh, ln, rsqrt and the product, forward and backward. f32: CUDA's tanhf/logf/rsqrtf against the CPU's libm,
/// a few ulp, so 1e-5. bf16: the same bf16-rounded inputs on both sides and one bf16 rounding of the f32 result,
/// 2^-8 relative. ln and rsqrt get inputs in [0.05, 4) (finite results); the product's are exact in f32.
fn check_products(gpu: &Device) {
    let n = 10_007;
    let x = random(n, -4.0, 4.0, 201);
    let p = random(n, 0.05, 4.0, 202);
    let g = random(n, -1.0, 1.0, 203);
    let pool = Pool::new(gpu, 8 * n * 4 + (1 << 16)).unwrap();
    for (dtype, rel, floor) in [(DType::F32, 1e-5, 1e-6), (DType::BF16, 2f32.powi(-8), 1e-6)] {
        let (xr, pr, gr) = (rounded(dtype, &x), rounded(dtype, &p), rounded(dtype, &g));
        let gx = upload(&pool, &[n], dtype, &xr);
        let gp = upload(&pool, &[n], dtype, &pr);
        let gg = upload(&pool, &[n], dtype, &gr);
        let mut gy = pool.alloc(&[n], dtype).unwrap();
        let mut gz = pool.alloc(&[n], dtype).unwrap();
        let (mut cy, mut cz) = (cpu(&[n], &vec![0.0; n]), cpu(&[n], &vec![0.0; n]));
        let unary: [(&str, Unary, &Tensor, &[f32]); 3] = [
            ("tanh_forward", elementwise::tanh_forward, &gx, &xr),
            ("log_forward", elementwise::log_forward, &gp, &pr),
            ("rsqrt_forward", elementwise::rsqrt_forward, &gp, &pr),
        ];
        for (name, op, input, values) in unary {
            op(input, &mut gy).unwrap();
            op(&cpu(&[n], values), &mut cy).unwrap();
            compare(&format!("{name} {dtype}"), &gy.to_f32_vec().unwrap(), cy.f32s().unwrap(), rel, floor);
        }
        // The tanh and rsqrt backwards take the forward's output; p in [0.05, 4) stands in for it (the kernels
        // do not care where it came from), and for the log backward's x.
        let binary: [(&str, Binary, &Tensor, &[f32]); 4] = [
            ("tanh_backward", elementwise::tanh_backward, &gx, &xr),
            ("log_backward", elementwise::log_backward, &gp, &pr),
            ("rsqrt_backward", elementwise::rsqrt_backward, &gp, &pr),
            ("mul", elementwise::mul, &gx, &xr),
        ];
        for (name, op, input, values) in binary {
            op(input, &gg, &mut gy).unwrap();
            op(&cpu(&[n], values), &cpu(&[n], &gr), &mut cy).unwrap();
            compare(&format!("{name} {dtype}"), &gy.to_f32_vec().unwrap(), cy.f32s().unwrap(), rel, floor);
        }
        elementwise::mul_backward(&gx, &gp, &gg, &mut gy, &mut gz).unwrap();
        elementwise::mul_backward(&cpu(&[n], &xr), &cpu(&[n], &pr), &cpu(&[n], &gr), &mut cy, &mut cz).unwrap();
        compare(&format!("mul_backward da {dtype}"), &gy.to_f32_vec().unwrap(), cy.f32s().unwrap(), rel, floor);
        compare(&format!("mul_backward db {dtype}"), &gz.to_f32_vec().unwrap(), cz.f32s().unwrap(), rel, floor);
    }
}
