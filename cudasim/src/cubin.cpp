// Reads what the simulator needs from a cubin NVRTC compiled: the kernels (global function symbols) and, per
// kernel, its register count, static shared memory, __launch_bounds__ and parameter layout. These are the
// numbers the real driver checks a launch against, so the simulator holds launches to the same limits.
//
// Layout facts (checked against ptxas' -v report for sm_80 and sm_90 cubins of NVRTC 13.0):
// - `.nv.info` holds EIATTR_REGCOUNT (0x2f) records: u32 symbol index, u32 registers.
// - `.nv.info.<kernel>` holds EIATTR_KPARAM_INFO (0x17) records: u32 0, u16 ordinal, u16 offset, u32 whose bits
//   18..31 are the size in bytes; and EIATTR_MAX_THREADS (0x05): u32 x, y, z of __launch_bounds__.
// - `.nv.shared.<kernel>` (NOBITS) is the kernel's static shared memory; for sm_90 it also counts the 1 KiB the
//   hardware reserves per block (an sm_80 cubin leaves it out). The architecture is bits 8..15 of e_flags.
// Records are {u8 format, u8 attribute, ...}: format 0x04 carries a u16 size and that many bytes, 0x03 a u16
// value, 0x02 a u8 value (padded to 4 bytes), 0x01 nothing.
#include "cubin.h"

#include <elf.h>

#include <cstring>

namespace cudasim {
namespace {
constexpr unsigned EIATTR_MAX_THREADS = 0x05;
constexpr unsigned EIATTR_KPARAM_INFO = 0x17;
constexpr unsigned EIATTR_REGCOUNT = 0x2f;
constexpr unsigned RESERVED_SHARED_SM90 = 1024;

template <typename T>
T read(const unsigned char* p) {
    T v;
    memcpy(&v, p, sizeof v);
    return v;
}

// Calls `record(attribute, payload, size)` for each record of an .nv.info section; false if it is malformed.
template <typename F>
bool for_each_record(const unsigned char* p, size_t size, F record) {
    size_t i = 0;
    while (i + 2 <= size) {
        const unsigned format = p[i], attribute = p[i + 1];
        switch (format) {
            case 0x01: i += 2; break;
            case 0x02: record(attribute, p + i + 2, 1); i += 4; break;
            case 0x03: record(attribute, p + i + 2, 2); i += 4; break;
            case 0x04: {
                if (i + 4 > size) return false;
                const size_t n = read<uint16_t>(p + i + 2);
                if (i + 4 + n > size) return false;
                record(attribute, p + i + 4, n);
                i += 4 + n;
                break;
            }
            default: return false;
        }
    }
    return true;
}
}  // namespace

bool read_cubin(const void* image, std::map<std::string, CubinKernel>& kernels, std::string* error) {
    const unsigned char* b = static_cast<const unsigned char*>(image);
    if (memcmp(b, ELFMAG, SELFMAG) != 0) {
        *error = "not an ELF image (a cubin is ELF; the simulator does not load PTX)";
        return false;
    }
    if (b[EI_CLASS] != ELFCLASS64) {
        *error = "not a 64-bit ELF image";
        return false;
    }
    const Elf64_Ehdr eh = read<Elf64_Ehdr>(b);
    if (eh.e_shentsize != sizeof(Elf64_Shdr) || eh.e_shstrndx >= eh.e_shnum) {
        *error = "malformed ELF section table";
        return false;
    }
    const unsigned arch = (eh.e_flags >> 8) & 0xff;
    const unsigned reserved_shared = arch >= 90 ? RESERVED_SHARED_SM90 : 0;
    std::vector<Elf64_Shdr> sections(eh.e_shnum);
    for (unsigned i = 0; i < eh.e_shnum; ++i) sections[i] = read<Elf64_Shdr>(b + eh.e_shoff + i * sizeof(Elf64_Shdr));
    const char* names = reinterpret_cast<const char*>(b + sections[eh.e_shstrndx].sh_offset);

    // Symbols: kernel names, and the index the per-kernel records use.
    std::map<unsigned, std::string> by_index;
    for (const Elf64_Shdr& s : sections) {
        if (s.sh_type != SHT_SYMTAB) continue;
        const char* strtab = reinterpret_cast<const char*>(b + sections[s.sh_link].sh_offset);
        for (size_t k = 0; k < s.sh_size / sizeof(Elf64_Sym); ++k) {
            const Elf64_Sym sym = read<Elf64_Sym>(b + s.sh_offset + k * sizeof(Elf64_Sym));
            if (ELF64_ST_TYPE(sym.st_info) == STT_FUNC && ELF64_ST_BIND(sym.st_info) == STB_GLOBAL) {
                kernels[strtab + sym.st_name];
                by_index[unsigned(k)] = strtab + sym.st_name;
            }
        }
    }
    if (kernels.empty()) {
        *error = "the cubin holds no kernel";
        return false;
    }
    for (const Elf64_Shdr& s : sections) {
        const std::string name = names + s.sh_name;
        const unsigned char* p = b + s.sh_offset;
        if (name == ".nv.info") {
            const bool ok = for_each_record(p, s.sh_size, [&](unsigned attribute, const unsigned char* v, size_t n) {
                if (attribute == EIATTR_REGCOUNT && n == 8) {
                    auto k = by_index.find(read<uint32_t>(v));
                    if (k != by_index.end()) kernels[k->second].registers = read<uint32_t>(v + 4);
                }
            });
            if (!ok) {
                *error = "malformed .nv.info section";
                return false;
            }
        } else if (name.rfind(".nv.info.", 0) == 0) {
            auto k = kernels.find(name.substr(9));
            if (k == kernels.end()) continue;
            CubinKernel& kernel = k->second;
            const bool ok = for_each_record(p, s.sh_size, [&](unsigned attribute, const unsigned char* v, size_t n) {
                if (attribute == EIATTR_KPARAM_INFO && n == 12) {
                    const unsigned ordinal = read<uint16_t>(v + 4), offset = read<uint16_t>(v + 6);
                    const unsigned size = read<uint32_t>(v + 8) >> 18;
                    if (kernel.param_sizes.size() <= ordinal) {
                        kernel.param_sizes.resize(ordinal + 1);
                        kernel.param_offsets.resize(ordinal + 1);
                    }
                    kernel.param_sizes[ordinal] = size;
                    kernel.param_offsets[ordinal] = offset;
                } else if (attribute == EIATTR_MAX_THREADS && n == 12) {
                    kernel.max_threads = read<uint32_t>(v) * read<uint32_t>(v + 4) * read<uint32_t>(v + 8);
                }
            });
            if (!ok) {
                *error = "malformed " + name + " section";
                return false;
            }
        } else if (name.rfind(".nv.shared.", 0) == 0) {
            auto k = kernels.find(name.substr(11));
            if (k == kernels.end()) continue;
            k->second.static_shared = s.sh_size > reserved_shared ? unsigned(s.sh_size - reserved_shared) : 0;
        }
    }
    return true;
}

}  // namespace cudasim
