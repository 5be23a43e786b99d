// The body of the fused two-layer kernels, written as barrier-free phases over (thread id, thread count).
// On the GPU a block runs each phase with threadIdx.x / blockDim.x and __syncthreads() between phases; the host
// emulator (fused_host in the _cuda test hooks) runs the same phases for every thread id in turn, which is
// equivalent because threads only read, in one phase, shared values written in earlier ones. So the index
// arithmetic the GPU uses is exercised and tested on machines without a GPU.
#pragma once
#include <cstdint>

#include "cuda/twolayer.hpp"

namespace physai::cuda {

enum class Mode { grad, hvp };
constexpr int kPhases = 5;

PHYSAI_HD int64_t imin(int64_t x, int64_t y) { return x < y ? x : y; }

// Shared-memory values per sample: H, GH (and RH) of width m; F, G (and RF, RG) of width k; one loss.
template <class T>
PHYSAI_HD int64_t shared_per_sample(const Net<T>& net, Mode mode) {
  return (mode == Mode::hvp ? 3 * net.m + 4 * net.k : 2 * net.m + 2 * net.k) + 1;
}

// One block's view: member e, tile size TS, shared memory, and its workspace row [P partials, loss partial].
template <class T, Mode mode>
struct Tile {
  Net<T> net;
  Targets<T> targets;
  Params<T, const T*> v;  // direction (hvp only)
  int64_t e, TS;
  T* smem;
  T* row;

  PHYSAI_HD void run_phase(int phase, int64_t tile, bool first, int64_t tid, int64_t nthreads) const {
    const int64_t m = net.m, d = net.d, k = net.k, P = net.params();
    T* H = smem;           // pre-activations [TS, m]
    T* GH = H + TS * m;    // dL/dh (grad) or R(dL/dh) (hvp) [TS, m]
    T* F = GH + TS * m;    // outputs [TS, k]
    T* G = F + TS * k;     // dL/df [TS, k]
    T* L = G + TS * k;     // per-sample loss [TS]
    T* RH = L + TS;        // hvp only: R(h) [TS, m]
    T* RF = RH + TS * m;   // R(f) [TS, k]
    T* RG = RF + TS * k;   // R(dL/df) [TS, k]
    const bool hvp = mode == Mode::hvp;
    const T* W = net.W_of(e);
    const T* b = net.b_of(e);
    const T* a = net.a_of(e);
    const T* vW = hvp ? v.W + e * v.sW : nullptr;
    const T* vb = hvp && net.b ? v.b + e * v.sb : nullptr;
    const T* va = hvp ? v.a + e * v.sa : nullptr;
    const T is = net.input_scale, os = net.output_scale;
    const int64_t s0 = tile * TS, ns = imin(TS, net.n - s0);
    const T* X = net.X_of(e) + s0 * d;
    const T* Y = targets.Y_of(e, net.n, k) + s0 * k;

    switch (phase) {
      case 0:  // h = is W x + b, and R(h) = is vW x + vb
        for (int64_t idx = tid; idx < ns * m; idx += nthreads) {
          const int64_t s = idx / m, i = idx % m;
          T acc = T(0), racc = T(0);
          for (int64_t c = 0; c < d; ++c) {
            acc += W[i * d + c] * X[s * d + c];
            if (hvp) racc += vW[i * d + c] * X[s * d + c];
          }
          H[idx] = is * acc + (b ? b[i] : T(0));
          if (hvp) RH[idx] = is * racc + (vb ? vb[i] : T(0));
        }
        break;
      case 1:  // f = os a sigma(h), and R(f) = os (va sigma(h) + a sigma'(h) R(h))
        for (int64_t idx = tid; idx < ns * k; idx += nthreads) {
          const int64_t s = idx / k, j = idx % k;
          T acc = T(0), racc = T(0);
          for (int64_t i = 0; i < m; ++i) {
            const ActValues<T> av = activation(net.activation, H[s * m + i]);
            acc += a[j * m + i] * av.s;
            if (hvp) racc += va[j * m + i] * av.s + a[j * m + i] * av.d1 * RH[s * m + i];
          }
          F[idx] = os * acc;
          if (hvp) RF[idx] = os * racc;
        }
        break;
      case 2:  // per-sample loss, g = dl/df, R(g) = (d^2 l/df^2) R(f)
        for (int64_t s = tid; s < ns; s += nthreads) {
          L[s] = loss_grad(targets.loss, F + s * k, Y + s * k, G + s * k, static_cast<int>(k));
          if (hvp) loss_hvp(targets.loss, F + s * k, Y + s * k, RF + s * k, RG + s * k, static_cast<int>(k));
        }
        break;
      case 3:  // dL/dh = os (a^T g) sigma'(h); R of it by the product rule
        for (int64_t idx = tid; idx < ns * m; idx += nthreads) {
          const int64_t s = idx / m, i = idx % m;
          const ActValues<T> av = activation(net.activation, H[idx]);
          T ag = T(0), rag = T(0);
          for (int64_t j = 0; j < k; ++j) {
            ag += a[j * m + i] * G[s * k + j];
            if (hvp) rag += va[j * m + i] * G[s * k + j] + a[j * m + i] * RG[s * k + j];
          }
          GH[idx] = hvp ? os * (rag * av.d1 + ag * av.d2 * RH[idx]) : os * ag * av.d1;
        }
        break;
      case 4: {  // this tile's parameter partials, summed over samples in order, added to the block's row
        // Each thread owns fixed parameter indices across tiles, so its reads and writes of `row` never race.
        const int64_t nW = m * d, nb = b ? m : 0;
        for (int64_t p = tid; p <= P; p += nthreads) {
          T acc = T(0);
          if (p < nW) {
            const int64_t i = p / d, c = p % d;
            for (int64_t s = 0; s < ns; ++s) acc += GH[s * m + i] * X[s * d + c];
            acc *= is;
          } else if (p < nW + nb) {
            for (int64_t s = 0; s < ns; ++s) acc += GH[s * m + (p - nW)];
          } else if (p < P) {
            const int64_t q = p - nW - nb, j = q / m, i = q % m;
            for (int64_t s = 0; s < ns; ++s) {
              const ActValues<T> av = activation(net.activation, H[s * m + i]);
              acc += hvp ? RG[s * k + j] * av.s + G[s * k + j] * av.d1 * RH[s * m + i] : G[s * k + j] * av.s;
            }
            acc *= os;
          } else {
            for (int64_t s = 0; s < ns; ++s) acc += L[s];
          }
          row[p] = first ? acc : row[p] + acc;
        }
        break;
      }
    }
  }
};

// Output element t of the reduction (t < E (P + 1)): sums member e's workspace rows in chunk order and applies
// the mean's normalization. loss may be null (hvp).
template <class T>
PHYSAI_HD void reduce_element(const Net<T>& net, const Targets<T>& targets, const T* ws, int64_t chunks, T* loss,
                              const Params<T>& out, int64_t t) {
  const int64_t P = net.params(), nW = net.m * net.d, nb = net.b ? net.m : 0;
  const T norm = targets.loss == Loss::CrossEntropy ? T(1) / T(net.n) : T(1) / (T(net.n) * T(net.k));
  const int64_t e = t / (P + 1), p = t % (P + 1);
  T acc = T(0);
  for (int64_t c = 0; c < chunks; ++c) acc += ws[(e * chunks + c) * (P + 1) + p];
  acc *= norm;
  if (p < nW) {
    out.W[e * out.sW + p] = acc;
  } else if (p < nW + nb) {
    out.b[e * out.sb + p - nW] = acc;
  } else if (p < P) {
    out.a[e * out.sa + p - nW - nb] = acc;
  } else if (loss) {
    loss[e] = acc;
  }
}

}  // namespace physai::cuda
