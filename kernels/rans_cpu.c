/* The rANS coder's chunk loops for CPU cores, with lc/3's context loops and the fingerprint's
 * sums, compiled on first use by lctriton.kernels.rans_cpu.
 *
 * Same format, byte for byte, as lctriton.kernels.reference.rans_encode / rans_decode (the
 * specification; its docstring states the coder) and the Triton kernels in kernels/rans.py:
 * 12-bit frequencies, a 32-bit state in [2**16, 2**32), 16-bit words, one independent chunk
 * per lane. Argument checks (tables, chunk sizes, chunk tables) stay in Python; these loops
 * only trust what the caller has validated and never read or write outside the buffers the
 * caller sized.
 *
 * Unsigned 32-bit arithmetic wraps exactly as the reference's numpy uint32 does, so a
 * corrupt stream decodes to the same state and is rejected by the same final check.
 */
#include <stdint.h>
#include <string.h>

#define PROB_BITS 12
#define SLOT_MASK ((1u << PROB_BITS) - 1u)
#define RANS_LOW (1u << 16)

/* A stream's table as the encoder uses it. x / f without a division (a division costs
 * several times the rest of a step): for 0 <= x < 2**32 and 1 <= f <= 2**12, with
 * l = ceil(log2 f) and m = floor(2**(32 + l) / f) + 1, x / f == (x * m) >> (32 + l)
 * (Granlund and Montgomery, 1994); m has 33 bits, so the product takes 128. */
struct enc_table {
    uint64_t magic[256];
    unsigned shift[256];
    const uint32_t *freq;
    const uint32_t *cum;
};

static void enc_table_init(struct enc_table *t, const uint32_t *freq, const uint32_t *cum)
{
    for (int s = 0; s < 256; s++) {
        unsigned l = 0;
        while (l < 12 && (1u << l) < freq[s])
            l++;
        t->shift[s] = 32 + l;
        t->magic[s] = freq[s] ? ((uint64_t)1 << t->shift[s]) / freq[s] + 1 : 0;
    }
    t->freq = freq;
    t->cum = cum;
}

/* One step of the coder: symbol s into state x, a word into scratch when it renormalizes.
 * A symbol of frequency 0 sets *bad; the state is then meaningless but every write stays
 * inside scratch (at most one word per symbol). */
static inline uint32_t enc_step(uint32_t x, unsigned s, const struct enc_table *t, uint16_t *scratch,
                                int64_t *emitted, unsigned *bad)
{
    uint32_t f = t->freq[s];
    *bad |= f == 0;
    /* f <= 4095, so f << 20 < 2**32; after the test x < f << 20, so the new state
     * ((x / f) << 12) + x % f + c stays below 2**32. */
    if (x >= (f << 20)) {
        scratch[(*emitted)++] = (uint16_t)x;
        x >>= 16;
    }
    uint32_t q = (uint32_t)(((unsigned __int128)x * t->magic[s]) >> t->shift[s]);
    return (q << PROB_BITS) + (x - q * f) + t->cum[s];
}

/* A coded chunk into out: the final state (low half first), then the words in the
 * decoder's reading order, the reverse of their emission. Returns the words written. */
static int64_t enc_flush(uint32_t x, const uint16_t *scratch, int64_t emitted, uint16_t *out)
{
    out[0] = (uint16_t)x;
    out[1] = (uint16_t)(x >> 16);
    for (int64_t j = 0; j < emitted; j++)
        out[2 + j] = scratch[emitted - 1 - j];
    return emitted + 2;
}

/* Chunks coded side by side: each chunk's state is one long chain of dependent
 * multiplies, so coding four independent chunks in one loop lets the core overlap them. */
#define ENC_WAYS 4

/* Encode `numel` symbols in chunks of `chunk` (the last one shorter).
 *
 * freq, cum: 256 entries each. out: room for numel + 2 * nchunks words. counts: one entry
 * per chunk. scratch: room for lct_rans_encode_scratch(chunk) words.
 *
 * Returns the number of words written, or -1 if a symbol has frequency 0 (out is then
 * undefined).
 */
int64_t lct_rans_encode(const uint8_t *sym, int64_t numel, int64_t chunk, const uint32_t *freq,
                        const uint32_t *cum, uint16_t *out, int64_t *counts, uint16_t *scratch)
{
    struct enc_table t;
    enc_table_init(&t, freq, cum);
    unsigned bad = 0;
    int64_t total = 0;
    int64_t nchunks = (numel + chunk - 1) / chunk;
    int64_t full = numel / chunk;
    int64_t k = 0;
    for (; k + ENC_WAYS <= full; k += ENC_WAYS) {
        const uint8_t *s0 = sym + k * chunk, *s1 = s0 + chunk, *s2 = s1 + chunk, *s3 = s2 + chunk;
        uint16_t *w0 = scratch, *w1 = w0 + chunk, *w2 = w1 + chunk, *w3 = w2 + chunk;
        uint32_t x0 = RANS_LOW, x1 = RANS_LOW, x2 = RANS_LOW, x3 = RANS_LOW;
        int64_t e0 = 0, e1 = 0, e2 = 0, e3 = 0;
        for (int64_t i = chunk - 1; i >= 0; i--) {
            x0 = enc_step(x0, s0[i], &t, w0, &e0, &bad);
            x1 = enc_step(x1, s1[i], &t, w1, &e1, &bad);
            x2 = enc_step(x2, s2[i], &t, w2, &e2, &bad);
            x3 = enc_step(x3, s3[i], &t, w3, &e3, &bad);
        }
        if (bad)
            return -1;
        total += counts[k] = enc_flush(x0, w0, e0, out + total);
        total += counts[k + 1] = enc_flush(x1, w1, e1, out + total);
        total += counts[k + 2] = enc_flush(x2, w2, e2, out + total);
        total += counts[k + 3] = enc_flush(x3, w3, e3, out + total);
    }
    for (; k < nchunks; k++) {
        const uint8_t *s = sym + k * chunk;
        int64_t len = (k == nchunks - 1) ? numel - k * chunk : chunk;
        uint32_t x = RANS_LOW;
        int64_t emitted = 0;
        for (int64_t i = len - 1; i >= 0; i--)
            x = enc_step(x, s[i], &t, scratch, &emitted, &bad);
        if (bad)
            return -1;
        total += counts[k] = enc_flush(x, scratch, emitted, out + total);
    }
    return total;
}

/* Words of scratch the encoders need for chunks of `chunk` symbols. */
int64_t lct_rans_encode_scratch(int64_t chunk)
{
    return ENC_WAYS * chunk;
}

/* Encode `nstreams` streams, stream j being the numel[j] symbols from sym + start[j] coded
 * with its own table (freq and cum: 256 entries per stream), each exactly as
 * lct_rans_encode codes it alone.
 *
 * out: room for sum(numel) + 2 * (total chunks) words; the streams' words follow each
 * other. counts: one entry per chunk, the streams' chunks in order. words: the words of
 * each stream. scratch: room for lct_rans_encode_scratch(chunk) words.
 *
 * Returns the number of words written, or -1 if a symbol has frequency 0 in its stream's
 * table (out is then undefined).
 */
int64_t lct_rans_encode_streams(const uint8_t *sym, int64_t nstreams, const int64_t *start,
                                const int64_t *numel, int64_t chunk, const uint32_t *freq,
                                const uint32_t *cum, uint16_t *out, int64_t *counts, int64_t *words,
                                uint16_t *scratch)
{
    int64_t total = 0;
    for (int64_t j = 0; j < nstreams; j++) {
        int64_t n = lct_rans_encode(sym + start[j], numel[j], chunk, freq + 256 * j, cum + 256 * j,
                                   out + total, counts, scratch);
        if (n < 0)
            return -1;
        words[j] = n;
        total += n;
        counts += (numel[j] + chunk - 1) / chunk;
    }
    return total;
}

/* A lane of the decoder: its tables, output, state and read position. */
struct dec_lane {
    const uint32_t *f;
    const uint32_t *c;
    const uint8_t *slot_symbol;
    uint8_t *o;
    int64_t pos;
    uint32_t x;
};

static inline void dec_lane_init(struct dec_lane *d, int64_t l, const uint16_t *words, const int64_t *start,
                                 const int64_t *table, const uint32_t *freq, const uint32_t *cum,
                                 const uint8_t *slots, uint8_t *out, int64_t stride)
{
    d->f = freq + (table[l] << 8);
    d->c = cum + (table[l] << 8);
    d->slot_symbol = slots + (table[l] << PROB_BITS);
    d->o = out + l * stride;
    d->pos = start[l] + 2;
    d->x = (uint32_t)words[start[l]] | ((uint32_t)words[start[l] + 1] << 16);
}

/* Symbol i of the lane: the slot's symbol, the state's step back, a word read when the
 * state falls below 2**16 (0 past the stream's end). */
static inline void dec_step(struct dec_lane *d, const uint16_t *words, int64_t nwords, int64_t i)
{
    uint32_t x = d->x;
    uint32_t slot = x & SLOT_MASK;
    uint8_t s = d->slot_symbol[slot];
    x = d->f[s] * (x >> PROB_BITS) + slot - d->c[s];
    if (x < RANS_LOW) {
        x = (x << 16) | (d->pos < nwords ? (uint32_t)words[d->pos] : 0u);
        d->pos++;
    }
    d->x = x;
    d->o[i] = s;
}

/* Whether the lane ended wrong: a correct chunk ends with every word read and x == 2**16. */
static inline int dec_lane_bad(const struct dec_lane *d, int64_t end)
{
    return d->x != RANS_LOW || d->pos != end;
}

/* Decode `nlanes` chunks, each its own lane.
 *
 * words: the streams' words laid end to end (nwords of them); a read past nwords gives 0,
 * as the reference's zero padding does. Lane l starts at word start[l], must end at word
 * end[l], decodes size[l] symbols with table table[l] (freq and cum: 256 entries per table;
 * slots: 4096 per table) into out + l * stride.
 *
 * Returns 0 when every lane ended with all its words read and its state back at 2**16,
 * else 1 (a corrupt or truncated stream).
 */
int lct_rans_decode(const uint16_t *words, int64_t nwords, int64_t nlanes, const int64_t *start,
                    const int64_t *end, const int64_t *size, const int64_t *table,
                    const uint32_t *freq, const uint32_t *cum, const uint8_t *slots, uint8_t *out,
                    int64_t stride)
{
    int bad = 0;
    int64_t l = 0;
    while (l < nlanes) {
        int64_t n = size[l];
        if (l + 4 <= nlanes && size[l + 1] == n && size[l + 2] == n && size[l + 3] == n) {
            /* Four lanes of one length side by side: their state chains overlap, as the
             * encoder's do (ENC_WAYS). */
            struct dec_lane d0, d1, d2, d3;
            dec_lane_init(&d0, l, words, start, table, freq, cum, slots, out, stride);
            dec_lane_init(&d1, l + 1, words, start, table, freq, cum, slots, out, stride);
            dec_lane_init(&d2, l + 2, words, start, table, freq, cum, slots, out, stride);
            dec_lane_init(&d3, l + 3, words, start, table, freq, cum, slots, out, stride);
            for (int64_t i = 0; i < n; i++) {
                dec_step(&d0, words, nwords, i);
                dec_step(&d1, words, nwords, i);
                dec_step(&d2, words, nwords, i);
                dec_step(&d3, words, nwords, i);
            }
            bad |= dec_lane_bad(&d0, end[l]) | dec_lane_bad(&d1, end[l + 1]) | dec_lane_bad(&d2, end[l + 2])
                   | dec_lane_bad(&d3, end[l + 3]);
            l += 4;
        } else {
            struct dec_lane d;
            dec_lane_init(&d, l, words, start, table, freq, cum, slots, out, stride);
            for (int64_t i = 0; i < n; i++)
                dec_step(&d, words, nwords, i);
            bad |= dec_lane_bad(&d, end[l]);
            l += 1;
        }
    }
    return bad;
}

/* lc/3's context stage (lctriton.kernels.reference, section "lc/3 contexts"). */

#define CONTEXT_OCTAVES 16
#define NUM_CONTEXTS (3 * CONTEXT_OCTAVES)

/* The context of each element from its moments' float32 bit patterns m and v. */
void lct_moment_contexts(const uint32_t *m, const uint32_t *v, int64_t n, uint8_t *out)
{
    for (int64_t i = 0; i < n; i++) {
        int32_t exp_m = (int32_t)((m[i] >> 23) & 0xFFu);
        int32_t exp_v = (int32_t)((v[i] >> 23) & 0xFFu);
        int32_t octave = exp_m - ((exp_v + 1) >> 1) - 63;
        octave = octave < -8 ? -8 : (octave > CONTEXT_OCTAVES - 9 ? CONTEXT_OCTAVES - 9 : octave);
        int32_t sign = (m[i] & 0x7FFFFFFFu) == 0 ? 2 : (m[i] >> 31) ? 0 : 1;
        out[i] = (uint8_t)(sign * CONTEXT_OCTAVES + octave + 8);
    }
}

/* lq/2's context of each element from its base's float32 bit patterns: 0 where the
 * exponent field E is 0, else clamp(E - offset, -7, 7) + 8. */
void lct_binade_contexts(const uint32_t *base, int64_t n, int32_t offset, uint8_t *out)
{
    for (int64_t i = 0; i < n; i++) {
        const int32_t exponent = (int32_t)((base[i] >> 23) & 0xFFu);
        int32_t binade = exponent - offset;
        binade = binade < -7 ? -7 : (binade > 7 ? 7 : binade);
        out[i] = (uint8_t)(exponent == 0 ? 0 : binade + 8);
    }
}

/* joint[ctx * nsym + sym] += 1 for every element. `joint` holds LANES tables of
 * NUM_CONTEXTS * nsym counts, zeroed by the caller, who adds them up: element i counts in
 * table i % LANES. One table would make each increment wait for the previous one whenever
 * neighbours share a (context, symbol) pair, which is most of them (an embedding's untouched
 * rows: one context, symbol 0). Returns -1, having counted nothing past the bad element, if a
 * context or symbol is out of range. */
#define LANES 4 /* a power of two */
int lct_context_histogram(const uint8_t *ctx, const uint8_t *sym, int64_t n, int64_t nsym, int64_t *joint)
{
    const int64_t table = NUM_CONTEXTS * nsym;
    for (int64_t i = 0; i < n; i++) {
        if (ctx[i] >= NUM_CONTEXTS || sym[i] >= nsym)
            return -1;
        joint[(i & (LANES - 1)) * table + ctx[i] * nsym + sym[i]]++;
    }
    return 0;
}

/* Where each context's run starts in the grouped order (start[c] = the count of contexts
 * below c), counting the contexts first (in LANES tables, as above). Returns -1 if a context
 * is not below NUM_CONTEXTS. */
static int context_runs(const uint8_t *ctx, int64_t n, int64_t *start)
{
    int64_t count[LANES][NUM_CONTEXTS] = {{0}};
    for (int64_t i = 0; i < n; i++) {
        if (ctx[i] >= NUM_CONTEXTS)
            return -1;
        count[i & (LANES - 1)][ctx[i]]++;
    }
    int64_t at = 0;
    for (int c = 0; c < NUM_CONTEXTS; c++) {
        start[c] = at;
        for (int l = 0; l < LANES; l++)
            at += count[l][c];
    }
    return 0;
}

/* Eight contexts at once: whether ctx[i..i+8) are all the same. Neighbours mostly share a
 * context where a parameter had no gradient (an embedding's untouched rows), and one
 * position counter bumped per element would make each store wait for the previous one; a
 * uniform block moves with one bump. Elsewhere contexts vary and the per-element loop is as
 * fast as it gets. */
#define BLOCK 8
static int uniform_block(const uint8_t *ctx)
{
    uint64_t word;
    memcpy(&word, ctx, BLOCK);
    return word == ctx[0] * 0x0101010101010101ull;
}

/* counts[c] = the number of elements of context c. Returns -1 if a context is not below
 * NUM_CONTEXTS (counts is then undefined). */
int lct_context_counts(const uint8_t *ctx, int64_t n, int64_t *counts)
{
    int64_t start[NUM_CONTEXTS];
    if (context_runs(ctx, n, start))
        return -1;
    for (int c = 0; c < NUM_CONTEXTS; c++)
        counts[c] = (c + 1 < NUM_CONTEXTS ? start[c + 1] : n) - start[c];
    return 0;
}

/* Stable counting sort of the symbols by context (reference.group_by_context). Returns -1,
 * writing nothing, if a context is out of range. */
int lct_group_by_context(const uint8_t *ctx, const uint8_t *sym, int64_t n, uint8_t *out)
{
    int64_t start[NUM_CONTEXTS];
    if (context_runs(ctx, n, start))
        return -1;
    int64_t i = 0;
    for (; i + BLOCK <= n; i += BLOCK) {
        if (uniform_block(ctx + i)) {
            memcpy(out + start[ctx[i]], sym + i, BLOCK);
            start[ctx[i]] += BLOCK;
        } else {
            for (int k = 0; k < BLOCK; k++)
                out[start[ctx[i + k]]++] = sym[i + k];
        }
    }
    for (; i < n; i++)
        out[start[ctx[i]]++] = sym[i];
    return 0;
}

/* The inverse: each element takes the next symbol of its context's run. */
int lct_ungroup_by_context(const uint8_t *ctx, const uint8_t *grouped, int64_t n, uint8_t *out)
{
    int64_t start[NUM_CONTEXTS];
    if (context_runs(ctx, n, start))
        return -1;
    int64_t i = 0;
    for (; i + BLOCK <= n; i += BLOCK) {
        if (uniform_block(ctx + i)) {
            memcpy(out + i, grouped + start[ctx[i]], BLOCK);
            start[ctx[i]] += BLOCK;
        } else {
            for (int k = 0; k < BLOCK; k++)
                out[i + k] = grouped[start[ctx[i + k]]++];
        }
    }
    for (; i < n; i++)
        out[i] = grouped[start[ctx[i]]++];
    return 0;
}

/* reference.fingerprint's sums over n signed words of `width` bytes (1, 2, 4 or 8), laid out
 * as rows of FINGERPRINT_ROW (the incomplete last row apart). sums[0]: the sum of all words;
 * sums[1]: of row sums times row number (from 1); sums[2]: of column sums times column number;
 * sums[3]: of the tail's words times their position. Every sum wraps modulo 2**64, as the
 * reference's int64/uint64 numpy sums do. One pass: the column sums stay in cache. Returns -1
 * for another width. */
#define FINGERPRINT_ROW 1024
#define FINGERPRINT_SUMS(T)                                                                   \
    do {                                                                                      \
        const T *w = (const T *)words;                                                        \
        for (int64_t r = 0; r < rows; r++, w += FINGERPRINT_ROW) {                            \
            uint64_t row = 0;                                                                 \
            for (int j = 0; j < FINGERPRINT_ROW; j++) {                                       \
                const uint64_t x = (uint64_t)(int64_t)w[j];                                   \
                row += x;                                                                     \
                col[j] += x;                                                                  \
            }                                                                                 \
            total += row;                                                                     \
            row_mix += (uint64_t)(r + 1) * row;                                               \
        }                                                                                     \
        for (int64_t i = 0; i < n - rows * FINGERPRINT_ROW; i++) {                            \
            const uint64_t x = (uint64_t)(int64_t)w[i];                                       \
            total += x;                                                                       \
            tail_mix += (uint64_t)(i + 1) * x;                                                \
        }                                                                                     \
    } while (0)

int lct_fingerprint_sums(const void *words, int64_t n, int width, uint64_t *sums)
{
    uint64_t col[FINGERPRINT_ROW] = {0};
    uint64_t total = 0, row_mix = 0, col_mix = 0, tail_mix = 0;
    const int64_t rows = n / FINGERPRINT_ROW;
    switch (width) {
    case 1: FINGERPRINT_SUMS(int8_t); break;
    case 2: FINGERPRINT_SUMS(int16_t); break;
    case 4: FINGERPRINT_SUMS(int32_t); break;
    case 8: FINGERPRINT_SUMS(int64_t); break;
    default: return -1;
    }
    for (int j = 0; j < FINGERPRINT_ROW; j++)
        col_mix += (uint64_t)(j + 1) * col[j];
    sums[0] = total;
    sums[1] = row_mix;
    sums[2] = col_mix;
    sums[3] = tail_mix;
    return 0;
}

/* lq/1 on float32 tensors (reference.lq_symbols / lq_reconstruct, which state the codec).
 * Values travel as their bit patterns; the prediction is one IEEE single multiply, as
 * numpy's float32 multiply, so every element gets the reference's bits (this file is
 * compiled with -ffp-contract=off, which keeps a multiply a multiply). */
#define FINE_SHIFT 19
#define NONFINITE(u) (((u) & 0x7F800000u) == 0x7F800000u)
#define NONFINITE_FINE_KEY (0xFFu << 4)

static uint32_t fine_key(uint32_t u)
{
    return NONFINITE(u) ? NONFINITE_FINE_KEY : u >> FINE_SHIFT;
}

static uint32_t float_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float bits_float(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* The prediction round(base * scale), the base itself where it is not finite. */
static uint32_t lq_prediction(uint32_t b, float scale)
{
    return NONFINITE(b) ? b : float_bits(bits_float(b) * scale);
}

/* Symbols and reconstruction of n values x against base (NULL: none). lut: a symbol for
 * each of the 8192 fine keys; reps: nreps >= 1 values (a symbol past the end takes the
 * last, as numpy's clipping take). Returns 1 if the reconstruction holds a non-finite
 * value, else 0. */
int lct_lq_symbols_f32(const uint32_t *x, const uint32_t *base, float scale, const uint8_t *lut,
                       const uint32_t *reps, int64_t nreps, int64_t n, uint8_t *sym, uint32_t *out)
{
    uint32_t nonfinite = 0;
    for (int64_t i = 0; i < n; i++) {
        uint8_t s = lut[fine_key(x[i])];
        uint32_t r = reps[s < nreps ? s : nreps - 1];
        if (base) {
            /* Selects rather than branches: a prediction hits or misses at random. */
            const uint32_t p = lq_prediction(base[i], scale);
            const uint32_t hit = lut[fine_key(p)] == s;
            s = (uint8_t)(hit ? 0 : s);
            r = hit ? p : r;
        }
        sym[i] = s;
        out[i] = r;
        nonfinite |= NONFINITE(r);
    }
    return nonfinite != 0;
}

/* The decoder's side: the prediction for symbol 0 (where there is a base), else the symbol's
 * value. */
void lct_lq_reconstruct_f32(const uint8_t *sym, const uint32_t *reps, int64_t nreps,
                            const uint32_t *base, float scale, int64_t n, uint32_t *out)
{
    for (int64_t i = 0; i < n; i++) {
        const uint8_t s = sym[i];
        out[i] = (base && s == 0) ? lq_prediction(base[i], scale) : reps[s < nreps ? s : nreps - 1];
    }
}

/* lc/1's symbols and reconstruction on float32 tensors (reference.lc_symbols /
 * lc_reconstruct): the symbol of the delta's fine key, and base + representative (+0.0 +
 * representative without a base). Symbol 0 copies the base where the base holds a NaN
 * anywhere, as the reference does, since processors quiet or replace NaN payloads in
 * arithmetic. */
static uint32_t lc_value(uint8_t s, const uint32_t *reps, int64_t nreps, const uint32_t *base, int64_t i)
{
    const float r = bits_float(reps[s < nreps ? s : nreps - 1]);
    return float_bits(base ? bits_float(base[i]) + r : r + 0.0f);
}

static int is_nan(uint32_t u)
{
    return (u & 0x7FFFFFFFu) > 0x7F800000u;
}

/* Symbol 0 copies the base (where the base holds a NaN); returns whether out holds a
 * non-finite value. */
static int lc_finish(const uint8_t *sym, const uint32_t *base, int base_nan, int64_t n, uint32_t *out)
{
    uint32_t nonfinite = 0;
    for (int64_t i = 0; i < n; i++) {
        if (base_nan && sym[i] == 0)
            out[i] = base[i];
        nonfinite |= NONFINITE(out[i]);
    }
    return nonfinite != 0;
}

/* lc/1's pass 1 on float32 tensors (reference.lc_histogram): counts[l * NUM_FINE_KEYS + k]
 * += 1 for every element whose delta x - base (x itself without a base; one IEEE single
 * subtract, as numpy's) has fine key k, in LANES tables (element i in table i % LANES, as
 * lct_context_histogram counts) that the caller zeroes and adds up. */
#define NUM_FINE_KEYS (1u << (32 - FINE_SHIFT))
void lct_lc_histogram_f32(const uint32_t *x, const uint32_t *base, int64_t n, int64_t *counts)
{
    if (base)
        for (int64_t i = 0; i < n; i++)
            counts[(i & (LANES - 1)) * NUM_FINE_KEYS + fine_key(float_bits(bits_float(x[i]) - bits_float(base[i])))]++;
    else
        for (int64_t i = 0; i < n; i++)
            counts[(i & (LANES - 1)) * NUM_FINE_KEYS + fine_key(x[i])]++;
}

int lct_lc_symbols_f32(const uint32_t *x, const uint32_t *base, const uint8_t *lut, const uint32_t *reps,
                       int64_t nreps, int64_t n, uint8_t *sym, uint32_t *out)
{
    uint32_t base_nan = 0;
    for (int64_t i = 0; i < n; i++) {
        const uint32_t d = base ? float_bits(bits_float(x[i]) - bits_float(base[i])) : x[i];
        const uint8_t s = lut[fine_key(d)];
        sym[i] = s;
        out[i] = lc_value(s, reps, nreps, base, i);
        if (base)
            base_nan |= is_nan(base[i]);
    }
    return lc_finish(sym, base, base_nan != 0, n, out);
}

void lct_lc_reconstruct_f32(const uint8_t *sym, const uint32_t *reps, int64_t nreps, const uint32_t *base,
                            int64_t n, uint32_t *out)
{
    uint32_t base_nan = 0;
    for (int64_t i = 0; i < n; i++) {
        out[i] = lc_value(sym[i], reps, nreps, base, i);
        if (base)
            base_nan |= is_nan(base[i]);
    }
    lc_finish(sym, base, base_nan != 0, n, out);
}

/* sq/1 (reference.sq_symbols / sq_reconstruct) on float32 first moments: each element's level
 * k = rint((x - base * scale) / sqrt(norm) * up) in units of sqrt(norm), in one pass. Writes
 * k + 128 (k = 0 at exceptions), the exception flags and the reconstruction
 * p + (k * down) * sqrt(norm) (the exact value at exceptions); returns the largest |k|.
 * Every operation is one IEEE single operation (no
 * contraction, no errno checks), so the bits are the reference's. */
int64_t lct_sq_symbols_f32(const float *x, const float *base, float scale, const float *norm, float up,
                           float down, int64_t n, uint8_t *levels, uint8_t *bad, float *out)
{
    /* 1.5 * 2**23: adding and subtracting it rounds |v| < 2**22 to an integer, ties to even. */
    const float magic = 12582912.0f;
    int64_t reach = 0;
    for (int64_t i = 0; i < n; i++) {
        const float p = base[i] * scale;
        const float s = __builtin_sqrtf(norm[i]);
        const float d = x[i] - p;
        float q = 0.0f;
        int ok = 1;
        if (d != 0.0f) {
            const float v = (d / s) * up;
            ok = v >= -127.5f && v <= 127.5f; /* false for NaN */
            if (ok) {
                q = (v + magic) - magic;
                ok = q >= -127.0f && q <= 127.0f;
            }
            if (!ok)
                q = 0.0f;
        }
        const float r = p + (q * down) * s;
        if (NONFINITE(float_bits(r))) {
            ok = 0;
            q = 0.0f;
        }
        const int k = (int)q;
        levels[i] = (uint8_t)(k + 128);
        bad[i] = (uint8_t)!ok;
        out[i] = ok ? r : x[i];
        const int64_t a = k < 0 ? -k : k;
        reach = a > reach ? a : reach;
    }
    return reach;
}

void lct_sq_reconstruct_f32(const uint8_t *sym, int64_t reach, float down, const float *base, float scale,
                            const float *norm, int64_t n, float *out)
{
    const int64_t top = 2 * reach;
    for (int64_t i = 0; i < n; i++) {
        const int64_t j = sym[i] > top ? top : sym[i];
        const float rep = (float)(j - reach) * down;
        out[i] = base[i] * scale + rep * __builtin_sqrtf(norm[i]);
    }
}
