#pragma once
#include <map>
#include <string>

#include "simt.h"

namespace cudasim {
// The kernels of a cubin, by name, with their launch limits; false with `error` set if the image is not a cubin.
bool read_cubin(const void* image, std::map<std::string, CubinKernel>& kernels, std::string* error);
}  // namespace cudasim
