/* Fused SwiGLU elementwise passes of the CPU blockwise kernel (layers/blockwise.py), one pass per block.
 *
 * With aten ops the forward reads and writes the [n, f] hidden block three times (silu, * up, * gate
 * weight) and the backward nine times (silu again, * up, * scale, the gate-weight gradient's product and
 * row sum, * scale, du, * up, silu_backward). Here each is one loop over the rows; the expert matmuls stay
 * with torch. No OpenMP threads: the callers already run one block per worker thread.
 *
 * exp is a Cephes-style polynomial (relative error ~1e-7 over the clamped range) so that the loops
 * vectorise without libm: no -ffast-math, which would also flush denormals process-wide when loaded.
 * Matrices are row-major with a row stride (ld*) so that column slices of a wider buffer work.
 */
#include <stdint.h>

static inline float exp_f32(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f; /* ln 2 in two parts: r = x - n ln2 exactly enough */
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } two_n = { .i = ((int32_t)n + 127) << 23 };
    return p * two_n.f;
}

/* h = silu(g) * u * s[row] (s NULL: 1) */
void swiglu_forward(int64_t n, int64_t f, const float *g, int64_t ldg, const float *u, int64_t ldu,
                    const float *s, float *h, int64_t ldh) {
    for (int64_t i = 0; i < n; i++) {
        const float *gi = g + i * ldg, *ui = u + i * ldu;
        float *hi = h + i * ldh;
        const float si = s ? s[i] : 1.0f;
#pragma omp simd
        for (int64_t j = 0; j < f; j++) {
            const float x = gi[j];
            hi[j] = x / (1.0f + exp_f32(-x)) * ui[j] * si;
        }
    }
}

/* From dh (the gradient of the scaled hidden units hs = silu(g) * u * s), in one pass per row:
 *   hs = silu(g) * u * s                       (the down projection's weight gradient is dy^T hs; NULL: skip)
 *   ds = sum_j dh * silu(g) * u                (the gate weight's gradient; NULL: skip)
 *   du = dh * s * silu(g)
 *   dg = dh * s * u * silu'(g),  silu'(x) = sigmoid(x) (1 + x (1 - sigmoid(x)))   (dg may be dh itself) */
void swiglu_backward(int64_t n, int64_t f, const float *g, int64_t ldg, const float *u, int64_t ldu,
                     const float *s, const float *dh, int64_t lddh, float *dg, int64_t lddg, float *du,
                     int64_t lddu, float *hs, int64_t ldhs, float *ds) {
    for (int64_t i = 0; i < n; i++) {
        const float *gi = g + i * ldg, *ui = u + i * ldu, *dhi = dh + i * lddh;
        float *dgi = dg + i * lddg, *dui = du + i * lddu, *hsi = hs ? hs + i * ldhs : 0;
        const float si = s ? s[i] : 1.0f;
        float acc = 0.0f;
#pragma omp simd reduction(+:acc)
        for (int64_t j = 0; j < f; j++) {
            const float x = gi[j], v = ui[j], d = dhi[j];
            const float sg = 1.0f / (1.0f + exp_f32(-x));
            const float a = x * sg, hu = a * v, d_s = d * si;
            acc += d * hu;
            if (hsi) hsi[j] = hu * si;
            dui[j] = d_s * a;
            dgi[j] = d_s * v * sg * (1.0f + x * (1.0f - sg));
        }
        if (ds) ds[i] = acc;
    }
}
