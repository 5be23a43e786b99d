// Gradient descent on every member (kernels.hpp: train), with the sharpness tracked inside the loop.
//
// Members are independent, so an ensemble runs each member's whole schedule as one task on one thread: a step costs
// no fork, join or barrier, which is what keeps training at full speed when another process shares the cores
// (OpenMP threads that wait at a barrier for a descheduled partner spin for their whole time slice). A lone member
// runs step by step with its work split inside each step (schedule.hpp). Either way each member's values are
// computed the same way whatever the thread count. numpy twin: physai/twolayer/reference.py (train).
#include <algorithm>
#include <cmath>
#include <exception>
#include <limits>
#include <memory>
#include <vector>

#include "common/errors.hpp"
#include "common/threading.hpp"
#include "twolayer/kernels.hpp"
#include "twolayer/passes.hpp"
#include "twolayer/schedule.hpp"

namespace physai::twolayer {

using namespace detail;

template <class T>
void train(const Net<T>& net, T* W, T* b, T* a, const Targets<T>& targets, const Schedule<T>& schedule, T* losses,
           const Tracking<T>& tracking) {
  validate(net);
  PHYSAI_REQUIRE(schedule.steps >= 0, "steps: expected >= 0, got ", schedule.steps);
  PHYSAI_REQUIRE(schedule.batch_size >= 0, "batch_size: expected >= 0, got ", schedule.batch_size);
  PHYSAI_REQUIRE(tracking.every >= 0, "track_sharpness_every: expected >= 0, got ", tracking.every);
  PHYSAI_REQUIRE(tracking.every == 0 || tracking.options.k == 1, "tracking: k must be 1");
  const int64_t E = net.E, n = net.n, m = net.m, k = net.k, d = net.d, P = net.params();
  const int64_t batch = schedule.batch_size > 0 ? std::min(schedule.batch_size, n) : n;
  const int64_t blocks = batch > 0 ? (n + batch - 1) / batch : 1;
  std::vector<T> dW(E * m * d), db(b ? E * m : 0), da(E * k * m);
  std::vector<T> eigenvector(tracking.every > 0 ? E * P : 0);
  std::vector<uint8_t> has_vector(E, 0);  // a member diverged at first has none until it recovers
  // The tracked steps' operator: storage only; each member computes its own caches at each of its tracked steps.
  const std::unique_ptr<HessianOperator<T>> tracked_operator =
      tracking.every > 0 && schedule.steps > 0 ? std::make_unique<HessianOperator<T>>(net, targets, false) : nullptr;

  // ---- one member's update, gradient and sharpness --------------------------------------------------------------

  auto update = [&](int64_t e) {
    const T lr = schedule.lr[e];
    T *W_e = W + e * m * d, *a_e = a + e * k * m;
    const T *gW = dW.data() + e * m * d, *ga = da.data() + e * k * m;
    for (int64_t i = 0; i < m * d; ++i) W_e[i] -= lr * schedule.lr_W * gW[i];
    if (b)
      for (int64_t i = 0; i < m; ++i) b[e * m + i] -= lr * schedule.lr_b * db[e * m + i];
    for (int64_t i = 0; i < k * m; ++i) a_e[i] -= lr * schedule.lr_a * ga[i];
  };

  // Member e's loss and gradient on rows r0 .. r0 + rows, then its update. With full-batch training a tracked step's
  // gradient comes from the tracked operator's caches, so tracking costs only the HVPs.
  auto step_member = [&](int64_t step, int64_t e, bool parallel, int64_t r0, int64_t rows,
                         const HessianOperator<T>* tracked) {
    T *gW = dW.data() + e * m * d, *gb = b ? db.data() + e * m : nullptr, *ga = da.data() + e * k * m;
    if (tracked && rows == n) {
      losses[step * E + e] = tracked->loss(e);
      tracked->member_gradient(e, parallel, gW, gb, ga);
    } else {
      const Net<T> view = row_view(net, e, r0, rows);  // the member's mini-batch
      const T* Y = targets.Y_of(e, n, k) + r0 * k;
      // decided by the member's own size, not by E, so that a member sums in the same order alone as in an
      // ensemble (same bits, whatever the rest of the ensemble)
      losses[step * E + e] = use_row_blocks(1, view)
                                 ? blocked_loss_and_grad(view, Y, targets.loss, gW, gb, ga)
                                 : member_loss_and_grad(view, Y, targets.loss, 0, gW, gb, ga, parallel, rows);
    }
    update(e);
  };

  // Member e's top Hessian eigenpair, warm-started from its previous one (ones where that is not finite; until it
  // has one, the solver's random start from the stream keyed tracking.streams[e], the member's identity, so that it
  // does not depend on the member's position in the ensemble). A member whose loss is no longer finite (diverged)
  // gets NaN and costs nothing.
  auto track_member = [&](int64_t row, int64_t e, bool parallel, const HessianOperator<T>& op) {
    tracking.sharpness[row * E + e] = std::numeric_limits<T>::quiet_NaN();
    tracking.matvecs[row * E + e] = 0;
    if (!std::isfinite(double(op.loss(e)))) return;
    T* vector = eigenvector.data() + e * P;
    std::vector<T> ones;
    const T* start = nullptr;
    if (has_vector[e]) {
      start = vector;  // the solver copies its start before it writes the new vector
      if (!std::all_of(vector, vector + P, [](T x) { return std::isfinite(double(x)); })) {
        ones.assign(P, T(1));
        start = ones.data();
      }
    }
    // A lone member keeps the whole operator (row blocks, split GEMMs); in an ensemble each member runs alone, in
    // the lone member's order: summed over the same row blocks when it is small enough for those (op.apply).
    auto matvec = [&](const T* V, T* out) {
      if (E == 1)
        op.apply(V, out);
      else if (use_row_blocks(1, net))
        sum_over_row_blocks(n, P, out, [&](int64_t r0, int64_t rows, T* partial) {
          op.apply_rows(e, r0, r0 + rows, V, partial, false);
        });
      else
        op.apply_rows(e, 0, n, V, out, parallel);
    };
    T top;
    uint8_t converged;
    eigensolve(tracking.use_lanczos, matvec, 1, P, tracking.options, start, &top, vector,
               tracking.matvecs + row * E + e, &converged, tracking.streams ? tracking.streams[e] : e);
    tracking.sharpness[row * E + e] = top;
    has_vector[e] = 1;
  };

  // Step `step` of member e: on a tracked step, the operator's caches at the current parameters, the sharpness, then
  // the gradient (from those caches when full-batch) and the update.
  auto run_step = [&](int64_t step, int64_t e, bool parallel) {
    const int64_t r0 = (step % blocks) * batch, rows = std::min(batch, n - r0);
    if (tracking.every > 0 && step % tracking.every == 0) {
      HessianOperator<T>& op = *tracked_operator;
      op.refresh_member(e, parallel);
      track_member(step / tracking.every, e, parallel, op);
      step_member(step, e, parallel, r0, rows, &op);
    } else {
      step_member(step, e, parallel, r0, rows, nullptr);
    }
  };

  // ---- the schedule ---------------------------------------------------------------------------------------------

  if (E == 1) {
    const bool parallel = num_threads() > 1 && work_of(net) >= kParallelWork;
    for (int64_t step = 0; step < schedule.steps; ++step) run_step(step, 0, parallel);
    return;
  }
  // An exception must not leave the parallel region; the first, in member order, is rethrown after it.
  std::vector<std::exception_ptr> errors(E);
  parallel_tasks(E, [&](int64_t e) {
    try {
      for (int64_t step = 0; step < schedule.steps; ++step) run_step(step, e, false);
    } catch (...) {
      errors[e] = std::current_exception();
    }
  });
  for (auto& error : errors)
    if (error) std::rethrow_exception(error);
}

#define PHYSAI_TWOLAYER_TRAIN(T) \
  template void train<T>(const Net<T>&, T*, T*, T*, const Targets<T>&, const Schedule<T>&, T*, const Tracking<T>&);
PHYSAI_TWOLAYER_TRAIN(float)
PHYSAI_TWOLAYER_TRAIN(double)

}  // namespace physai::twolayer
