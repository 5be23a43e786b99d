// Public interface of the fused two-layer network kernels for ensembles, CPU (the network: twolayer/net.hpp).
// Results are bitwise the same for any thread count. numpy twin: physai/twolayer/reference.py.
//
// Where each part lives (one idea per file):
//   twolayer/net.hpp        Net and Targets, the description of an ensemble every backend takes
//   twolayer/math.hpp       activations and losses with their derivatives (shared with the CUDA kernels)
//   twolayer/schedule.hpp   how members, row blocks and GEMM blocks share the threads; views of a member's rows
//   twolayer/rows.{hpp,cpp} elementwise row kernels, cloned for AVX-512 and AVX2/FMA
//   twolayer/passes.hpp     tile passes shared by the files below
//   twolayer/gradient.cpp   forward, backward, loss + gradient; the forward that saves and backward from it
//   twolayer/hvp.cpp        the Hessian operator (R-operator) and its eigenpairs
//   twolayer/train.cpp      the gradient-descent loop with sharpness tracking
//   common/gemm.{hpp,cpp}   deterministic blocked GEMM (plain loops, micro-kernels or BLAS, by the product's shape)
//   common/simd.hpp         vector type and fixed-order reductions
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "spectrum/eigensolvers.hpp"
#include "twolayer/math.hpp"
#include "twolayer/net.hpp"

namespace physai::twolayer {

// Checks extents and scales (cheap re-check of the Python layer).
template <class T>
void validate(const Net<T>& net);

// F [E, n, k]
template <class T>
void forward(const Net<T>& net, T* F);

// Gradients of sum(F * G) for given output gradients G [E, n, k]: dW [E,m,d], db [E,m] (with bias), da [E,k,m],
// dX (null to skip) shaped like X. With a shared X, dX [E, n, d] holds each member's part.
template <class T>
void backward(const Net<T>& net, const T* G, T* dW, T* db, T* da, T* dX);

// The forward of a training step, keeping what its backward needs so that backward_saved need not recompute the
// hidden layer: F [E, n, k], S = sigma(Z) [E, n, m] and D1 = sigma'(Z) [E, n, m], which is null where
// slope_from_value(activation) (sigma' is then read off S).
template <class T>
void forward_saving(const Net<T>& net, T* F, T* S, T* D1);

// Whether sigma' is a function of sigma's value that gives the same bits as activate() (relu: S > 0, tanh: 1 - S^2,
// linear: 1), so that a forward_saving need not keep it.
bool slope_from_value(Activation act);

// The gradients of backward (same outputs) from what forward_saving kept: S, and D1 unless slope_from_value.
template <class T>
void backward_saved(const Net<T>& net, const T* G, const T* S, const T* D1, T* dW, T* db, T* da, T* dX);

// Per-member mean loss [E] and its gradients, in one fused pass.
template <class T>
void loss_and_grad(const Net<T>& net, const Targets<T>& targets, T* loss, T* dW, T* db, T* da);

// The Hessian of each member's full-batch loss, as an operator. Construction caches S, sigma', the outputs and their
// gradients, and the backpropagated dS times sigma' and sigma'', so each apply() costs about one gradient (two GEMMs
// of the input size).
// Vectors are flattened per member: V, out [E, P] with P = net.params().
template <class T>
class HessianOperator {
 public:
  // compute_caches false: storage only; refresh_member(e) must run before member e's products (the training loop
  // computes each member's caches on that member's thread).
  HessianOperator(const Net<T>& net, const Targets<T>& targets, bool compute_caches = true);
  // Recomputes the caches at the current values of the parameters the net points to (same shapes, same buffers).
  void refresh();
  // The same for member e alone (its caches and loss only, so members may refresh on different threads): the
  // training loop refreshes one operator this way at every tracked step instead of allocating a new one.
  void refresh_member(int64_t e, bool inner_parallel);
  // A member whose row of V is zero costs nothing (its product is zero).
  void apply(const T* V, T* out) const;
  // The contribution of rows row_begin .. row_end of member e's batch to its product (the whole product for 0 .. n).
  void apply_rows(int64_t e, int64_t row_begin, int64_t row_end, const T* v, T* out, bool inner_parallel) const;
  // Member e's gradients at the operator's parameters, from the cached quantities (two GEMMs of the input size);
  // db null without bias. Its loss is loss(e).
  void member_gradient(int64_t e, bool inner_parallel, T* dW, T* db, T* da) const;
  const Net<T>& net() const { return net_; }
  int64_t params() const { return net_.params(); }
  T loss(int64_t e) const { return loss_[e]; }

 private:
  Net<T> net_;
  Targets<T> targets_;
  // Each [E, n, m] or [E, n, k]; left uninitialised (every entry is written before it is read), which spares a
  // memset of the four large caches on every construction.
  // dZ_ = dS sigma' (what the gradient needs) and dS_D2_ = dS sigma'' (what the HVP needs) with dS = os G a.
  // A tanh network with one output keeps neither D1_ nor dS_D2_ (null): its HVP pass reads sigma' and sigma'' off S
  // (hvp.cpp), and dZ_ takes sigma' from S with the same bits (slope_from_value), which spares 2 E n m values.
  bool slope_caches() const { return !(net_.k == 1 && net_.activation == Activation::Tanh); }
  std::unique_ptr<T[]> S_, D1_, dS_D2_, dZ_, F_, G_;
  std::vector<T> loss_;                      // [E]
};

// Top-k Hessian eigenpairs of each member (the sharpness is values[e, 0]) on the fused HVP, by Lanczos or power
// iteration (k = 1) from csrc/spectrum; v0 [E, P] warm start or null. Outputs as in spectrum::lanczos.
template <class T>
void hessian_eigs(const Net<T>& net, const Targets<T>& targets, const spectrum::Options& options, bool use_lanczos,
                  const T* v0, T* values, T* vectors, int64_t* matvecs, uint8_t* converged);

namespace detail {

// Lanczos (k pairs) or power iteration (the dominant pair) from csrc/spectrum on a batched matvec.
template <class T, class MatVec>
void eigensolve(bool use_lanczos, MatVec&& matvec, int64_t E, int64_t P, const spectrum::Options& options, const T* v0,
                T* values, T* vectors, int64_t* matvecs, uint8_t* converged, int64_t first_member = 0) {
  if (use_lanczos)
    spectrum::lanczos<T>(matvec, E, P, options, v0, values, vectors, matvecs, converged, first_member);
  else
    spectrum::power_iteration<T>(matvec, E, P, options, v0, values, vectors, matvecs, converged, first_member);
}

}  // namespace detail

// Learning rates of a GD run: lr [E] per member, times a per-layer multiplier (the parameterization's).
template <class T>
struct Schedule {
  const T* lr = nullptr;
  T lr_W = T(1), lr_b = T(1), lr_a = T(1);
  int64_t steps = 0;
  int64_t batch_size = 0;  // 0: full batch; otherwise cyclic contiguous row blocks (the last block may be short)
};

// Sharpness tracking inside train: every `every` steps (0: never), the top Hessian eigenvalue of each member's
// full-batch loss, warm-started from the previous top eigenvector. Outputs [ceil(steps / every), E]; a member whose
// loss is no longer finite (diverged) gets NaN and costs no HVPs, so one divergent learning rate does not stop a sweep.
template <class T>
struct Tracking {
  int64_t every = 0;
  spectrum::Options options;
  bool use_lanczos = true;
  T* sharpness = nullptr;
  int64_t* matvecs = nullptr;
  // [E] the key of member e's random stream (its solver's first start): the member's identity, not its position,
  // so that a member gets the same values alone as in any ensemble (TwoLayer.init_index). Null: e.
  const int64_t* streams = nullptr;
};

// Runs schedule.steps of gradient descent on all members, updating W, b, a in place (the same memory as net's
// parameter pointers). losses [steps, E] receives the loss of each step before its update.
template <class T>
void train(const Net<T>& net, T* W, T* b, T* a, const Targets<T>& targets, const Schedule<T>& schedule, T* losses,
           const Tracking<T>& tracking);

}  // namespace physai::twolayer
