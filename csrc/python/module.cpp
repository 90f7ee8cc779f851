// The al_ext._C Python module. Loading it registers the ops (static initialisers in
// registration.cpp); the module itself only reports how it was built.
#include <torch/extension.h>

#ifndef AL_EXT_TORCH_VERSION
#error "AL_EXT_TORCH_VERSION must be set by the build (the torch version compiled against)"
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "al_ext compiled core: op kernels registered under torch.ops.al_ext";
  m.def("build_info", [] {
    pybind11::dict info;
    info["torch_version"] = AL_EXT_TORCH_VERSION;
#ifdef AL_EXT_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
    return info;
  }, "How this extension was built: the torch version it was compiled against and whether it has CUDA kernels.");
}
