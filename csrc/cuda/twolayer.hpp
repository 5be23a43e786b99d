// Host-side interface of the CUDA two-layer kernels (plain C++: included by the pybind11 bindings, which are
// compiled without nvcc). Pointers are device pointers; `stream` is a cudaStream_t passed as an integer.
#pragma once
#include <cstdint>

#include "cuda/twolayer_math.cuh"
#include "twolayer/net.hpp"

namespace physai::cuda {

// The network and its targets are the CPU kernels' (twolayer/net.hpp), so both backends take one description.
using twolayer::Net;
using twolayer::Targets;

// A per-member parameter-shaped output or direction: pointers to the W, b, a parts and their member strides.
template <class T, class P = T*>
struct Params {
  P W = nullptr, b = nullptr, a = nullptr;
  int64_t sW = 0, sb = 0, sa = 0;
};

// f [E, n, k].
template <class T>
void forward(const Net<T>& net, T* f, std::uintptr_t stream);

// loss [E]; gradients of the mean loss written to grad.
template <class T>
void loss_and_grad(const Net<T>& net, const Targets<T>& targets, T* loss, const Params<T>& grad, std::uintptr_t stream);

// Hessian of the mean loss applied to direction v, written to out.
template <class T>
void hvp(const Net<T>& net, const Targets<T>& targets, const Params<T, const T*>& v, const Params<T>& out,
         std::uintptr_t stream);

// Power iteration on the HVP, per member, with the convergence test of csrc/spectrum's power_iteration: member e
// stops when ||H v - theta v|| <= tol |theta| (theta = v . H v, v a unit vector) or H v = 0, or after max_matvecs
// products. v [E, P] (P = net.params(), device) holds the start vectors and receives the final unit iterates;
// values [E] (device) the Rayleigh quotients; matvecs [E] and converged [E] (host) each member's products and
// whether it met the test. A member whose product is not finite raises std::invalid_argument naming it.
template <class T>
void power_iteration(const Net<T>& net, const Targets<T>& targets, T* v, T* values, int64_t max_matvecs, double tol,
                     int64_t* matvecs, uint8_t* converged, std::uintptr_t stream);

// Number of CUDA devices: 0 without a driver or a device; std::runtime_error when the runtime fails otherwise.
int device_count();
int runtime_version();        // CUDART_VERSION this module was built against, e.g. 13000
const char* architectures();  // the compute capabilities compiled, e.g. "900"

}  // namespace physai::cuda
