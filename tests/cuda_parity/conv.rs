//! Convolution kernels against the CPU reference: Conv2d (every kernel size / stride / padding, including the
//! asymmetric VAE downsampler pad), ConvTranspose2d k4 s2 p1 and Conv1d k3 p1, forward, input gradient,
//! weight gradient (`+=` onto random values) and bias gradient (`+=`), in f32 and bf16. Shapes mix tiny odd
//! images (every tile edge) with channel counts past 64 (several tiles along both GEMM axes).
//!
//! Both sides read the same values (rounded to the storage dtype first), so the differences are the order of
//! f32 accumulation (~1e-7 * sqrt(terms) relative to the terms) and, for bf16, one rounding of the output
//! (2^-9 relative). Bounds: f32 1e-5 relative, bf16 2^-8 relative; both plus a floor of 1e-5 * sqrt(terms)
//! for outputs that cancel to near zero (terms = the length of the reduction behind each output).

use anyhow::Result;
use sgdm::ops::conv::{
    conv1d_backward_input, conv1d_backward_weight, conv1d_forward, conv2d_backward_input, conv2d_backward_input_using, conv2d_backward_weight,
    conv2d_backward_weight_using, conv2d_forward, conv2d_forward_using, conv_backward_bias, conv_transpose2d_backward_input,
    conv_transpose2d_backward_weight, conv_transpose2d_forward, im2col, Conv2dSpec, ConvKernel, Padding,
};
use sgdm::{DType, Device, Tensor};

use crate::common::{compare, random, rounded};

type Forward = Box<dyn Fn(&Tensor, &Tensor, Option<&Tensor>, &mut Tensor) -> Result<()>>;
/// (dy, w, dx) for the input gradient; (x, dy, dw) for the weight gradient.
type Backward = Box<dyn Fn(&Tensor, &Tensor, &mut Tensor) -> Result<()>>;

/// One convolution layer, whatever its kind, with the reduction lengths behind each output it computes.
struct Layer {
    name: String,
    x: Vec<usize>,
    w: Vec<usize>,
    y: Vec<usize>,
    forward: Forward,
    backward_input: Backward,
    backward_weight: Backward,
    /// Terms summed per output, input-gradient element and weight-gradient element.
    terms: [usize; 3],
}

fn conv2d(n: usize, c: usize, (h, w): (usize, usize), k: usize, kernel: usize, spec: Conv2dSpec) -> Layer {
    let pad = spec.padding;
    let p = (h + pad.top + pad.bottom - kernel) / spec.stride + 1;
    let q = (w + pad.left + pad.right - kernel) / spec.stride + 1;
    Layer {
        name: format!("conv2d {n}x{c}x{h}x{w}->{k} k{kernel} s{} {pad:?}", spec.stride),
        x: vec![n, c, h, w],
        w: vec![k, c, kernel, kernel],
        y: vec![n, k, p, q],
        forward: Box::new(move |x, w, b, y| conv2d_forward(x, w, b, spec, y)),
        backward_input: Box::new(move |dy, w, dx| conv2d_backward_input(dy, w, spec, dx)),
        backward_weight: Box::new(move |x, dy, dw| conv2d_backward_weight(x, dy, spec, dw)),
        terms: [c * kernel * kernel, k * kernel * kernel, n * p * q],
    }
}

fn conv_transpose2d(n: usize, ci: usize, (h, w): (usize, usize), co: usize) -> Layer {
    let spec = Conv2dSpec::new(2, 1);
    Layer {
        name: format!("conv_transpose2d {n}x{ci}x{h}x{w}->{co} k4 s2 p1"),
        x: vec![n, ci, h, w],
        w: vec![ci, co, 4, 4],
        y: vec![n, co, 2 * h, 2 * w],
        forward: Box::new(move |x, w, b, y| conv_transpose2d_forward(x, w, b, spec, y)),
        backward_input: Box::new(move |dy, w, dx| conv_transpose2d_backward_input(dy, w, spec, dx)),
        backward_weight: Box::new(move |x, dy, dw| conv_transpose2d_backward_weight(x, dy, spec, dw)),
        terms: [ci * 16, co * 16, n * h * w],
    }
}

fn conv1d(n: usize, c: usize, l: usize, k: usize) -> Layer {
    Layer {
        name: format!("conv1d {n}x{c}x{l}->{k} k3 p1"),
        x: vec![n, c, l],
        w: vec![k, c, 3],
        y: vec![n, k, l],
        forward: Box::new(move |x, w, b, y| conv1d_forward(x, w, b, 1, 1, y)),
        backward_input: Box::new(move |dy, w, dx| conv1d_backward_input(dy, w, 1, 1, dx)),
        backward_weight: Box::new(move |x, dy, dw| conv1d_backward_weight(x, dy, 1, 1, dw)),
        terms: [c * 3, k * 3, n * l],
    }
}

fn layers() -> Vec<Layer> {
    let mut out = Vec::new();
    for (kernel, pads) in [(1, [0, 1]), (3, [0, 1]), (4, [1, 2])] {
        for stride in [1, 2] {
            for pad in pads {
                out.push(conv2d(1, 3, (7, 9), 5, kernel, Conv2dSpec::new(stride, pad)));
            }
        }
    }
    out.push(conv2d(1, 3, (7, 9), 5, 3, Conv2dSpec::VAE_DOWNSAMPLE));
    let lopsided = Conv2dSpec { stride: 1, padding: Padding { top: 2, bottom: 0, left: 1, right: 3 } };
    out.push(conv2d(2, 4, (6, 5), 3, 3, lopsided));
    // Several 64-wide tiles along rows (channels) and columns (pixels), with ragged last tiles.
    out.push(conv2d(2, 70, (13, 11), 67, 3, Conv2dSpec::new(1, 1)));
    out.push(conv2d(2, 33, (17, 15), 130, 3, Conv2dSpec::VAE_DOWNSAMPLE));
    out.push(conv2d(2, 96, (9, 7), 80, 1, Conv2dSpec::new(1, 0)));
    out.push(conv2d(1, 65, (10, 12), 66, 4, Conv2dSpec::new(2, 1)));
    out.push(conv_transpose2d(1, 3, (7, 9), 5));
    out.push(conv_transpose2d(2, 70, (5, 6), 33));
    out.push(conv1d(1, 5, 17, 7));
    out.push(conv1d(3, 100, 17, 64));
    out
}

fn upload(gpu: &Device, shape: &[usize], dtype: DType, values: &[f32]) -> Tensor {
    Tensor::from_f32(gpu, shape, dtype, values).unwrap()
}

fn host(shape: &[usize], values: &[f32]) -> Tensor {
    Tensor::from_f32(&Device::Cpu, shape, DType::F32, values).unwrap()
}

fn check_layer(gpu: &Device, dtype: DType, layer: &Layer, seed: u64) {
    let len = |s: &[usize]| s.iter().product::<usize>();
    let channels = layer.y[1];
    let rel = if dtype == DType::BF16 { 2f32.powi(-8) } else { 1e-5 };
    let floor = |terms: usize| 1e-5 * (terms as f32).sqrt();
    let values = |shape: &[usize], seed: u64| rounded(dtype, &random(len(shape), -1.0, 1.0, seed));
    let (x, w, b, g) = (values(&layer.x, seed), values(&layer.w, seed + 1), values(&[channels], seed + 2), values(&layer.y, seed + 3));
    let (dw0, db0) = (values(&layer.w, seed + 4), values(&[channels], seed + 5));
    let garbage = |shape: &[usize]| vec![7.0; len(shape)]; // outputs are written, so this must vanish

    let (gx, gw, gb, gdy) =
        (upload(gpu, &layer.x, dtype, &x), upload(gpu, &layer.w, dtype, &w), upload(gpu, &[channels], dtype, &b), upload(gpu, &layer.y, dtype, &g));
    let (cx, cw, cb, cdy) = (host(&layer.x, &x), host(&layer.w, &w), host(&[channels], &b), host(&layer.y, &g));
    let tag = format!("{} {dtype}", layer.name);

    for with_bias in [false, true] {
        let mut gy = upload(gpu, &layer.y, dtype, &garbage(&layer.y));
        (layer.forward)(&gx, &gw, with_bias.then_some(&gb), &mut gy).unwrap();
        let mut cy = host(&layer.y, &garbage(&layer.y));
        (layer.forward)(&cx, &cw, with_bias.then_some(&cb), &mut cy).unwrap();
        let what = format!("{tag} forward{}", if with_bias { " +bias" } else { "" });
        compare(&what, &gy.to_f32_vec().unwrap(), cy.f32s().unwrap(), rel, floor(layer.terms[0]));
    }

    let mut gdx = upload(gpu, &layer.x, dtype, &garbage(&layer.x));
    (layer.backward_input)(&gdy, &gw, &mut gdx).unwrap();
    let mut cdx = host(&layer.x, &garbage(&layer.x));
    (layer.backward_input)(&cdy, &cw, &mut cdx).unwrap();
    compare(&format!("{tag} dx"), &gdx.to_f32_vec().unwrap(), cdx.f32s().unwrap(), rel, floor(layer.terms[1]));

    let mut gdw = upload(gpu, &layer.w, dtype, &dw0);
    (layer.backward_weight)(&gx, &gdy, &mut gdw).unwrap();
    let mut cdw = host(&layer.w, &dw0);
    (layer.backward_weight)(&cx, &cdy, &mut cdw).unwrap();
    compare(&format!("{tag} dw +="), &gdw.to_f32_vec().unwrap(), cdw.f32s().unwrap(), rel, floor(layer.terms[2]));

    let mut gdb = upload(gpu, &[channels], dtype, &db0);
    conv_backward_bias(&gdy, &mut gdb).unwrap();
    let mut cdb = host(&[channels], &db0);
    conv_backward_bias(&cdy, &mut cdb).unwrap();
    let bias_terms = len(&layer.y) / channels;
    compare(&format!("{tag} db +="), &gdb.to_f32_vec().unwrap(), cdb.f32s().unwrap(), rel, floor(bias_terms));
}

pub fn check(gpu: &Device) {
    for dtype in [DType::F32, DType::BF16] {
        for (i, layer) in layers().iter().enumerate() {
            check_layer(gpu, dtype, layer, 9000 + 10 * i as u64);
        }
        // The bench baseline's im2col only moves values: bit-exact against the CPU.
        for (xs, kernel, spec) in [([2, 5, 7, 9], [3, 3], Conv2dSpec::new(1, 1)), ([1, 3, 8, 8], [3, 3], Conv2dSpec::VAE_DOWNSAMPLE)] {
            let x = rounded(dtype, &random(xs.iter().product(), -1.0, 1.0, 9900));
            let crs = xs[1] * kernel[0] * kernel[1];
            let pq = if spec.stride == 1 { xs[2] * xs[3] } else { (xs[2] / 2) * (xs[3] / 2) };
            let col_shape = [xs[0], crs, pq];
            let gx = Tensor::from_f32(gpu, &xs, dtype, &x).unwrap();
            let mut gcol = Tensor::from_f32(gpu, &col_shape, dtype, &vec![f32::NAN; xs[0] * crs * pq]).unwrap();
            let mut ccol = Tensor::zeros(&Device::Cpu, &col_shape, DType::F32).unwrap();
            im2col(&gx, kernel, spec, &mut gcol).unwrap();
            im2col(&Tensor::from_f32(&Device::Cpu, &xs, DType::F32, &x).unwrap(), kernel, spec, &mut ccol).unwrap();
            assert_eq!(gcol.to_f32_vec().unwrap(), ccol.f32s().unwrap(), "im2col {xs:?} {spec:?} {dtype}");
        }
        println!("im2col {dtype}: bit-exact");
    }
    check_forward_kernels(gpu);
}

/// Both bf16 forward, data-gradient and weight-gradient kernels, named explicitly (the default dispatch above runs the tensor-core one): edge
/// tiles on every GEMM axis (K past 128 and not a multiple of it, columns past 128, reductions not a multiple
/// of 32), stride 2 with the VAE's asymmetric padding, 1x1, and an SD 1.5 level at a small latent.
fn check_forward_kernels(gpu: &Device) {
    let dtype = DType::BF16;
    let shapes: [(usize, usize, usize, usize, usize, Conv2dSpec); 5] = [
        (1, 3, 9, 5, 3, Conv2dSpec::new(1, 1)),
        (2, 20, 12, 130, 3, Conv2dSpec::new(1, 1)),
        (1, 8, 11, 16, 3, Conv2dSpec::VAE_DOWNSAMPLE),
        (1, 64, 4, 32, 1, Conv2dSpec::new(1, 0)),
        (2, 320, 16, 320, 3, Conv2dSpec::new(1, 1)),
    ];
    for (i, &(n, c, side, k, kernel, spec)) in shapes.iter().enumerate() {
        let pad = spec.padding;
        let p = (side + pad.top + pad.bottom - kernel) / spec.stride + 1;
        let q = (side + pad.left + pad.right - kernel) / spec.stride + 1;
        let (xs, ws, ys) = ([n, c, side, side], [k, c, kernel, kernel], [n, k, p, q]);
        let seed = 9500 + 10 * i as u64;
        let x = rounded(dtype, &random(xs.iter().product(), -1.0, 1.0, seed));
        let w = rounded(dtype, &random(ws.iter().product(), -1.0, 1.0, seed + 1));
        let b = rounded(dtype, &random(k, -1.0, 1.0, seed + 2));
        let mut cy = host(&ys, &vec![0.0; ys.iter().product()]);
        conv2d_forward(&host(&xs, &x), &host(&ws, &w), Some(&host(&[k], &b)), spec, &mut cy).unwrap();
        let terms = c * kernel * kernel;
        for variant in [ConvKernel::TensorCore, ConvKernel::Simt] {
            let mut gy = upload(gpu, &ys, dtype, &vec![7.0; ys.iter().product()]);
            let (gx, gw, gb) = (upload(gpu, &xs, dtype, &x), upload(gpu, &ws, dtype, &w), upload(gpu, &[k], dtype, &b));
            conv2d_forward_using(variant, &gx, &gw, Some(&gb), spec, &mut gy).unwrap();
            let what = format!("conv2d {n}x{c}x{side}x{side}->{k} k{kernel} s{} {variant:?} bf16 forward", spec.stride);
            compare(&what, &gy.to_f32_vec().unwrap(), cy.f32s().unwrap(), 2f32.powi(-8), 1e-5 * (terms as f32).sqrt());
        }
        // The data gradient: tensor cores at stride 1 (rotated, transposed weights), the CUDA-core kernel
        // otherwise; both against the CPU.
        let dy = rounded(dtype, &random(ys.iter().product(), -1.0, 1.0, seed + 3));
        let mut cdx = host(&xs, &vec![0.0; xs.iter().product()]);
        conv2d_backward_input(&host(&ys, &dy), &host(&ws, &w), spec, &mut cdx).unwrap();
        let terms = k * kernel * kernel;
        for variant in [ConvKernel::TensorCore, ConvKernel::Simt] {
            let mut gdx = upload(gpu, &xs, dtype, &vec![7.0; xs.iter().product()]);
            conv2d_backward_input_using(variant, &upload(gpu, &ys, dtype, &dy), &upload(gpu, &ws, dtype, &w), spec, &mut gdx).unwrap();
            let what = format!("conv2d {n}x{c}x{side}x{side}->{k} k{kernel} s{} {variant:?} bf16 dx", spec.stride);
            compare(&what, &gdx.to_f32_vec().unwrap(), cdx.f32s().unwrap(), 2f32.powi(-8), 1e-5 * (terms as f32).sqrt());
        }
        // The weight gradient (+= onto random values): tensor cores with the reduction split when the output
        // tiles are few (the SD-level shape splits in two, the small ones run one slice), and the CUDA cores.
        let prior = rounded(dtype, &random(ws.iter().product(), -1.0, 1.0, seed + 4));
        let mut cdw = host(&ws, &prior);
        conv2d_backward_weight(&host(&xs, &x), &host(&ys, &dy), spec, &mut cdw).unwrap();
        let terms = n * p * q;
        for variant in [ConvKernel::TensorCore, ConvKernel::Simt] {
            let mut gdw = upload(gpu, &ws, dtype, &prior);
            conv2d_backward_weight_using(variant, &upload(gpu, &xs, dtype, &x), &upload(gpu, &ys, dtype, &dy), spec, &mut gdw).unwrap();
            let what = format!("conv2d {n}x{c}x{side}x{side}->{k} k{kernel} s{} {variant:?} bf16 dw +=", spec.stride);
            compare(&what, &gdw.to_f32_vec().unwrap(), cdw.f32s().unwrap(), 2f32.powi(-8), 1e-5 * (terms as f32).sqrt());
        }
    }
}
