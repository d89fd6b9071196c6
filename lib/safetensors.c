/* Checkpoints in the safetensors format: an 8-byte little-endian header
 * length N, N bytes of JSON (tensor name -> dtype, shape, data_offsets, plus
 * an optional "__metadata__" object of strings), then the raw data.
 *
 * Files are untrusted input: every size is checked against the file before
 * it is used, the JSON is parsed by cJSON with a length bound, and every
 * entry is validated (dtype, shape, offsets within the data section, no
 * overlaps, no duplicate names) before any tensor memory is allocated. */
#define _POSIX_C_SOURCE 200809L
#include "internal.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

/* Same limit as the reference implementation (MAX_HEADER_SIZE). */
#define ST_MAX_HEADER 100000000ull
/* Each tensor's data starts at a multiple of this in the loaded block. */
#define ST_ALIGN 16u
/* Bound on the JSON values of a header (see header_bytes_ok): about ten
 * per tensor, so 400k tensors. */
#define ST_MAX_VALUES 4194304u
#define ST_MAX_VALUES_STR "4194304"
/* JSON numbers are doubles: integers are exact up to 2^53. */
#define ST_MAX_INT 9007199254740992.0

struct pl_safetensors {
    char *label; /* the file name, for messages */
    int n;
    pl_safetensors_entry *e;        /* header order */
    pl_safetensors_entry **by_name; /* sorted by name, for lookups */
    int n_meta;
    const char **meta_keys, **meta_values;
    char *strings; /* pool holding every name, key and value */
    void *data;    /* every tensor's data, one block */
};

/* Messages read "fn: 'file': problem". */
__attribute__((format(printf, 4, 5))) static pl_status fail(const char *fn, const char *label,
                                                            pl_status s, const char *fmt, ...) {
    char buf[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return pl__err(s, "%s: '%s': %s", fn, label, buf);
}

static bool host_is_le(void) {
    const uint16_t one = 1;
    unsigned char b;
    memcpy(&b, &one, 1);
    return b == 1;
}

static void swap32(void *p, size_t n) {
    unsigned char *b = p;
    for (size_t i = 0; i < n; i++, b += 4) {
        unsigned char t0 = b[0], t1 = b[1];
        b[0] = b[3];
        b[1] = b[2];
        b[2] = t1;
        b[3] = t0;
    }
}

static const char *dtype_tag(pl_dtype dt) { return dt == PL_F32 ? "F32" : "I32"; }
static const char *st_dtype_tag(pl_st_dtype dt) {
    return dt == PL_ST_F16 ? "F16" : dt == PL_ST_BF16 ? "BF16" : dt == PL_ST_I32 ? "I32" : "F32";
}
/* Bytes per element in the file. */
static uint64_t st_size(pl_st_dtype dt) { return dt == PL_ST_F16 || dt == PL_ST_BF16 ? 2 : 4; }

/* IEEE binary16 -> binary32 bits, exact: sign s, exponent e (bias 15), mantissa m.
 *   e = 31: inf (m = 0) or NaN (payload m kept in the top mantissa bits);
 *   0 < e < 31: (1 + m/2^10) 2^(e-15)  -> exponent e - 15 + 127, mantissa m << 13;
 *   e = 0: m 2^-24, normalised: with m's top bit at p, 1.f 2^(p-24), the
 *          shift sh = 10 - p brings it to bit 10 and the exponent is 113 - sh. */
static uint32_t f16_bits_to_f32(uint32_t h) {
    uint32_t s = (h & 0x8000u) << 16, e = h >> 10 & 0x1fu, m = h & 0x3ffu;
    if (e == 31) return s | 0x7f800000u | m << 13;
    if (e) return s | (e + 112) << 23 | m << 13;
    if (!m) return s;
    uint32_t sh = 0;
    while (!(m & 0x400u)) m <<= 1, sh++;
    return s | (113 - sh) << 23 | (m & 0x3ffu) << 13;
}

/* binary32 -> bfloat16, rounding to nearest even (carry into the exponent
 * gives the next binade, or inf past the largest finite value); a NaN stays a
 * NaN (quiet bit set, sign kept), never rounds into inf. */
static uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)(u >> 16 | 0x40u);
    u += 0x7fffu + (u >> 16 & 1u);
    return (uint16_t)(u >> 16);
}

/* n elements of 2 bytes (little endian) at in -> float32 at out. */
static void half_to_f32(pl_st_dtype dt, const unsigned char *in, float *out, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint32_t h = (uint32_t)in[2 * i] | (uint32_t)in[2 * i + 1] << 8;
        uint32_t u = dt == PL_ST_F16 ? f16_bits_to_f32(h) : h << 16; /* bf16: the top half */
        memcpy(out + i, &u, 4);
    }
}

/* Length of the UTF-8 sequence at s[0..n), or 0 if it is not valid UTF-8
 * (overlong forms, surrogates and code points above U+10FFFF are not). */
static size_t utf8_seq(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    if (c < 0x80) return 1;
    size_t len;
    uint32_t cp;
    if (c >= 0xC2 && c <= 0xDF)
        len = 2, cp = c & 0x1F;
    else if (c >= 0xE0 && c <= 0xEF)
        len = 3, cp = c & 0x0F;
    else if (c >= 0xF0 && c <= 0xF4)
        len = 4, cp = c & 0x07;
    else
        return 0;
    if (len > n) return 0;
    for (size_t k = 1; k < len; k++) {
        if ((s[k] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (s[k] & 0x3F);
    }
    if (len == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) return 0;
    if (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) return 0;
    return len;
}

static bool valid_utf8(const char *str) {
    const unsigned char *s = (const unsigned char *)str;
    size_t n = strlen(str);
    for (size_t i = 0, k; i < n; i += k)
        if (!(k = utf8_seq(s + i, n - i))) return false;
    return true;
}

/* The header must be UTF-8 with no raw control bytes (JSON allows tab,
 * newline and return between tokens, and none inside strings) and no
 * \u0000 escape (cJSON would cut a name there, so "a\u0000b" would read as
 * "a"). It may hold at most ST_MAX_VALUES JSON values: cJSON spends about
 * 64 bytes on each, so a hostile 100 MB header of "[0,0,0,..." would cost
 * gigabytes. A value is the root or follows '[', ',' or ':' outside a
 * string, which bounds the count. Returns false with *at and *why set on
 * the first bad byte. */
static bool header_bytes_ok(const unsigned char *s, size_t n, size_t *at, const char **why) {
    bool in_str = false;
    size_t values = 1;
    for (size_t i = 0, k; i < n; i += k) {
        *at = i;
        if (!(k = utf8_seq(s + i, n - i))) {
            *why = "invalid UTF-8";
            return false;
        }
        if (s[i] < 0x20 && s[i] != '\t' && s[i] != '\n' && s[i] != '\r') {
            *why = "a control byte";
            return false;
        }
        if (s[i] == '\\' && i + 1 < n) {
            if (i + 5 < n && s[i + 1] == 'u' && !memcmp(s + i + 2, "0000", 4)) {
                *why = "a \\u0000 escape";
                return false;
            }
            if (s[i + 1] == '\\' || s[i + 1] == '"') k = 2; /* skip the escaped byte */
        } else if (s[i] == '"') {
            in_str = !in_str;
        } else if (!in_str && (s[i] == '-' || (s[i] >= '0' && s[i] <= '9'))) {
            /* The only numbers of the format are shapes and data_offsets:
             * plain non-negative integers, so "-0", "2e0", "2.0", "01" are
             * not (cJSON would read them all as integers). */
            size_t j = i;
            bool plain = true;
            while (j < n && strchr("0123456789+-.eE", s[j]) && s[j]) {
                plain &= s[j] >= '0' && s[j] <= '9';
                j++;
            }
            if (!plain || (s[i] == '0' && j - i > 1)) {
                *why = "a number that is not a plain non-negative integer";
                return false;
            }
            k = j - i;
        } else if (!in_str && (s[i] == '[' || s[i] == ',' || s[i] == ':') &&
                   ++values > ST_MAX_VALUES) {
            *why = "more than " ST_MAX_VALUES_STR " JSON values (the limit)";
            return false;
        }
    }
    return true;
}

/* "[2, 3]" into buf. */
static const char *dims_str(const uint64_t *d, int nd, char *buf, size_t size) {
    size_t o = (size_t)snprintf(buf, size, "[");
    for (int i = 0; i < nd && o < size; i++)
        o += (size_t)snprintf(buf + o, size - o, i ? ", %llu" : "%llu", (unsigned long long)d[i]);
    if (o < size) snprintf(buf + o, size - o, "]");
    return buf;
}

/* ------------------------------------------------------------------------ */
/* Loading                                                                   */

void pl_safetensors_close(pl_safetensors *st) {
    if (!st) return;
    pl__free(st->label);
    pl__free(st->e);
    pl__free(st->by_name);
    pl__free(st->meta_keys);
    pl__free(st->meta_values);
    pl__free(st->strings);
    pl__free(st->data);
    pl__free(st);
}

/* A JSON number that is an integer in [0, 2^53]. */
static bool json_uint(const cJSON *j, uint64_t *out) {
    if (!cJSON_IsNumber(j)) return false;
    double v = j->valuedouble;
    if (!isfinite(v) || v < 0 || v > ST_MAX_INT || v != floor(v)) return false;
    *out = (uint64_t)v;
    return true;
}

/* Safetensors dtypes that libplasa does not hold, for a clearer message. */
static const char *const other_dtypes[] = {"BOOL", "U8",  "I8",  "F8_E5M2", "F8_E4M3", "I16",
                                           "U16",  "U32", "F64", "I64",     "U64"};

static int cmp_entry_name(const void *a, const void *b) {
    const pl_safetensors_entry *x = *(pl_safetensors_entry *const *)a,
                               *y = *(pl_safetensors_entry *const *)b;
    return strcmp(x->name, y->name);
}
static int cmp_entry_begin(const void *a, const void *b) {
    const pl_safetensors_entry *x = *(pl_safetensors_entry *const *)a,
                               *y = *(pl_safetensors_entry *const *)b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    return (x->end > y->end) - (x->end < y->end);
}
static int cmp_str(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Where the data section comes from: a file (at offset base) or memory. */
typedef struct {
    FILE *f;
    uint64_t base;
    const unsigned char *mem;
} st_source;

/* Checks the bytes (8-byte length, N) that precede the JSON. */
static bool check_lengths(const char *fn, const char *label, uint64_t size, uint64_t n) {
    if (n > ST_MAX_HEADER)
        fail(fn, label, PL_ERR_FORMAT, "header length %llu exceeds the limit of %llu bytes",
             (unsigned long long)n, ST_MAX_HEADER);
    else if (n > size - 8)
        fail(fn, label, PL_ERR_FORMAT,
             "header length %llu runs past the end of the file (%llu bytes follow the length)",
             (unsigned long long)n, (unsigned long long)(size - 8));
    else if (n == 0)
        fail(fn, label, PL_ERR_FORMAT, "header length is 0 (the header must be a JSON object)");
    else
        return true;
    return false;
}

/* Validates one tensor entry of the header into e (name set by the caller). */
static bool parse_entry(const char *fn, const char *label, const cJSON *j, uint64_t data_size,
                        pl_safetensors_entry *e) {
    const char *nm = e->name;
    char buf[200];
    if (!cJSON_IsObject(j)) {
        fail(fn, label, PL_ERR_FORMAT, "entry '%s' is not an object", nm);
        return false;
    }
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(j, "dtype");
    const cJSON *sh = cJSON_GetObjectItemCaseSensitive(j, "shape");
    const cJSON *off = cJSON_GetObjectItemCaseSensitive(j, "data_offsets");
    if (!cJSON_IsString(dt)) {
        fail(fn, label, PL_ERR_FORMAT, "tensor '%s' has no string \"dtype\"", nm);
        return false;
    }
    /* F16 and BF16 load as float32. */
    if (!strcmp(dt->valuestring, "F32"))
        e->file_dtype = PL_ST_F32;
    else if (!strcmp(dt->valuestring, "I32"))
        e->file_dtype = PL_ST_I32;
    else if (!strcmp(dt->valuestring, "F16"))
        e->file_dtype = PL_ST_F16;
    else if (!strcmp(dt->valuestring, "BF16"))
        e->file_dtype = PL_ST_BF16;
    else {
        bool known = false;
        for (size_t i = 0; i < sizeof other_dtypes / sizeof *other_dtypes; i++)
            known |= !strcmp(dt->valuestring, other_dtypes[i]);
        fail(fn, label, PL_ERR_FORMAT,
             known ? "tensor '%s' has dtype '%.40s'; libplasa reads only F32, F16, BF16 and I32"
                   : "tensor '%s' has unknown dtype '%.40s'",
             nm, dt->valuestring);
        return false;
    }
    e->dtype = e->file_dtype == PL_ST_I32 ? PL_I32 : PL_F32;
    const uint64_t es = st_size(e->file_dtype);
    if (!cJSON_IsArray(sh)) {
        fail(fn, label, PL_ERR_FORMAT, "tensor '%s' has no \"shape\" array", nm);
        return false;
    }
    uint64_t dims[PL_MAX_DIMS];
    int nd = 0;
    const cJSON *d;
    cJSON_ArrayForEach(d, sh) {
        if (nd == PL_MAX_DIMS) {
            fail(fn, label, PL_ERR_FORMAT, "tensor '%s' has more than %d dims", nm, PL_MAX_DIMS);
            return false;
        }
        if (!json_uint(d, &dims[nd])) {
            fail(fn, label, PL_ERR_FORMAT,
                 "tensor '%s': shape entry %d is not a non-negative integer", nm, nd);
            return false;
        }
        nd++;
    }
    uint64_t be[2];
    if (!cJSON_IsArray(off) || cJSON_GetArraySize(off) != 2 ||
        !json_uint(cJSON_GetArrayItem(off, 0), &be[0]) ||
        !json_uint(cJSON_GetArrayItem(off, 1), &be[1])) {
        fail(fn, label, PL_ERR_FORMAT,
             "tensor '%s': \"data_offsets\" must be two non-negative integers [begin, end]", nm);
        return false;
    }
    if (be[0] > be[1]) {
        fail(fn, label, PL_ERR_FORMAT, "tensor '%s': data_offsets [%llu, %llu] begin after end", nm,
             (unsigned long long)be[0], (unsigned long long)be[1]);
        return false;
    }
    if (be[1] > data_size) {
        fail(fn, label, PL_ERR_FORMAT,
             "tensor '%s': data_offsets [%llu, %llu] run past the end of the data section "
             "(%llu bytes; file truncated?)",
             nm, (unsigned long long)be[0], (unsigned long long)be[1],
             (unsigned long long)data_size);
        return false;
    }
    /* numel * es must equal the span; the span bounds numel, so no overflow. */
    uint64_t span = be[1] - be[0], numel = 1;
    for (int i = 0; i < nd; i++)
        if (dims[i] == 0) numel = 0;
    for (int i = 0; i < nd && numel; i++) {
        if (numel > (span / es) / dims[i]) {
            fail(fn, label, PL_ERR_FORMAT,
                 "tensor '%s': shape %s of %s needs more than the %llu bytes that "
                 "data_offsets [%llu, %llu] hold",
                 nm, dims_str(dims, nd, buf, sizeof buf), st_dtype_tag(e->file_dtype),
                 (unsigned long long)span, (unsigned long long)be[0], (unsigned long long)be[1]);
            return false;
        }
        numel *= dims[i];
    }
    if (numel * es != span) {
        fail(fn, label, PL_ERR_FORMAT,
             "tensor '%s': shape %s of %s needs %llu bytes but data_offsets [%llu, %llu] hold "
             "%llu",
             nm, dims_str(dims, nd, buf, sizeof buf), st_dtype_tag(e->file_dtype),
             (unsigned long long)(numel * es), (unsigned long long)be[0], (unsigned long long)be[1],
             (unsigned long long)span);
        return false;
    }
    e->ndim = nd;
    for (int i = 0; i < nd; i++) e->shape[i] = (int64_t)dims[i];
    e->numel = (int64_t)numel;
    e->begin = be[0];
    e->end = be[1];
    return true;
}

static size_t round_up(size_t x) { return (x + ST_ALIGN - 1) & ~(size_t)(ST_ALIGN - 1); }

/* Validates the JSON header (len bytes) against a data section of data_size
 * bytes and reads every tensor from src. */
static pl_safetensors *parse_header(const char *fn, const char *label, const char *json, size_t len,
                                    uint64_t data_size, const st_source *src) {
    size_t at;
    const char *why;
    if (!header_bytes_ok((const unsigned char *)json, len, &at, &why)) {
        fail(fn, label, PL_ERR_FORMAT, "header has %s at byte %zu", why, at);
        return NULL;
    }
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(json, len, &end, 0);
    if (!root) {
        size_t pos = end && end >= json && end <= json + len ? (size_t)(end - json) : 0;
        fail(fn, label, PL_ERR_FORMAT, "header is not valid JSON (error near byte %zu)", pos);
        return NULL;
    }
    pl_safetensors *st = NULL;
    pl_safetensors_entry **tmp = NULL;
    const char **keys_sorted = NULL;
    unsigned char *half = NULL;
    /* The reference writer pads the header with spaces. */
    for (const char *p = end; p < json + len; p++)
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') {
            fail(fn, label, PL_ERR_FORMAT, "header has data after the JSON value (byte %zu)",
                 (size_t)(p - json));
            goto bad;
        }
    if (!cJSON_IsObject(root)) {
        fail(fn, label, PL_ERR_FORMAT, "header is JSON but not an object");
        goto bad;
    }

    /* Count tensors and string bytes; check the metadata. */
    size_t n = 0, n_meta = 0, str_bytes = 0;
    const cJSON *meta = NULL, *it;
    cJSON_ArrayForEach(it, root) {
        if (!strcmp(it->string, "__metadata__")) {
            if (meta) {
                fail(fn, label, PL_ERR_FORMAT, "header has two \"__metadata__\" entries");
                goto bad;
            }
            meta = it;
            if (!cJSON_IsObject(meta)) {
                fail(fn, label, PL_ERR_FORMAT, "\"__metadata__\" is not an object");
                goto bad;
            }
            const cJSON *m;
            cJSON_ArrayForEach(m, meta) {
                if (!cJSON_IsString(m)) {
                    fail(fn, label, PL_ERR_FORMAT, "metadata value of '%s' is not a string",
                         m->string);
                    goto bad;
                }
                str_bytes += strlen(m->string) + strlen(m->valuestring) + 2;
                n_meta++;
            }
        } else {
            str_bytes += strlen(it->string) + 1;
            n++;
        }
    }
    if (n > INT32_MAX / 4 || n_meta > INT32_MAX / 4) {
        fail(fn, label, PL_ERR_FORMAT, "header has too many entries");
        goto bad;
    }

    st = pl__calloc(1, sizeof *st);
    if (!st || !(st->label = pl__strdup(label)) || !(st->e = pl__calloc(n + 1, sizeof *st->e)) ||
        !(st->by_name = pl__calloc(n + 1, sizeof *st->by_name)) ||
        !(tmp = pl__calloc(n + 1, sizeof *tmp)) ||
        !(st->meta_keys = pl__calloc(n_meta + 1, sizeof(char *))) ||
        !(st->meta_values = pl__calloc(n_meta + 1, sizeof(char *))) ||
        !(keys_sorted = pl__calloc(n_meta + 1, sizeof(char *))) ||
        !(st->strings = pl__malloc(str_bytes + 1))) {
        fail(fn, label, PL_ERR_NOMEM, "out of memory reading the header");
        goto bad;
    }
    char *sp = st->strings;
#define POOL(dst, s)                                                                               \
    do {                                                                                           \
        size_t l_ = strlen(s) + 1;                                                                 \
        memcpy(sp, (s), l_);                                                                       \
        (dst) = sp;                                                                                \
        sp += l_;                                                                                  \
    } while (0)
    if (meta) {
        const cJSON *m;
        cJSON_ArrayForEach(m, meta) {
            POOL(st->meta_keys[st->n_meta], m->string);
            POOL(st->meta_values[st->n_meta], m->valuestring);
            keys_sorted[st->n_meta] = st->meta_keys[st->n_meta];
            st->n_meta++;
        }
        qsort(keys_sorted, (size_t)st->n_meta, sizeof *keys_sorted, cmp_str);
        for (int i = 1; i < st->n_meta; i++)
            if (!strcmp(keys_sorted[i], keys_sorted[i - 1])) {
                fail(fn, label, PL_ERR_FORMAT, "metadata key '%s' appears twice", keys_sorted[i]);
                goto bad;
            }
    }
    cJSON_ArrayForEach(it, root) {
        if (it == meta) continue;
        if (!it->string[0]) {
            fail(fn, label, PL_ERR_FORMAT, "a tensor has an empty name");
            goto bad;
        }
        pl_safetensors_entry *e = &st->e[st->n];
        POOL(e->name, it->string);
        if (!parse_entry(fn, label, it, data_size, e)) goto bad;
        st->by_name[st->n] = e;
        st->n++;
    }
#undef POOL
    qsort(st->by_name, (size_t)st->n, sizeof *st->by_name, cmp_entry_name);
    for (int i = 1; i < st->n; i++)
        if (!strcmp(st->by_name[i]->name, st->by_name[i - 1]->name)) {
            fail(fn, label, PL_ERR_FORMAT, "tensor name '%s' appears twice", st->by_name[i]->name);
            goto bad;
        }
    /* No two tensors may share bytes (empty ones hold none). */
    size_t n_data = 0, total = 0;
    for (int i = 0; i < st->n; i++)
        if (st->e[i].numel) {
            tmp[n_data++] = &st->e[i];
            total += round_up((size_t)st->e[i].numel * 4);
        }
    qsort(tmp, n_data, sizeof *tmp, cmp_entry_begin);
    for (size_t i = 1; i < n_data; i++)
        if (tmp[i]->begin < tmp[i - 1]->end) {
            fail(fn, label, PL_ERR_FORMAT,
                 "tensors '%s' [%llu, %llu] and '%s' [%llu, %llu] overlap", tmp[i - 1]->name,
                 (unsigned long long)tmp[i - 1]->begin, (unsigned long long)tmp[i - 1]->end,
                 tmp[i]->name, (unsigned long long)tmp[i]->begin, (unsigned long long)tmp[i]->end);
            goto bad;
        }
    /* The tensors' byte ranges cover the data section exactly: no gap before,
     * between or after them (the format's rule; what is not a tensor's is not
     * read). Empty tensors hold no bytes: their offsets need only lie within it. */
    uint64_t covered = 0;
    for (size_t i = 0; i < n_data; i++) {
        if (tmp[i]->begin != covered) {
            fail(fn, label, PL_ERR_FORMAT,
                 "bytes [%llu, %llu) of the data section belong to no tensor (a gap before "
                 "'%s')",
                 (unsigned long long)covered, (unsigned long long)tmp[i]->begin, tmp[i]->name);
            goto bad;
        }
        covered = tmp[i]->end;
    }
    if (covered != data_size) {
        fail(fn, label, PL_ERR_FORMAT,
             "%llu bytes after the last tensor (the data section is %llu bytes; tensors cover "
             "%llu)",
             (unsigned long long)(data_size - covered), (unsigned long long)data_size,
             (unsigned long long)covered);
        goto bad;
    }

    /* Now the sizes are known to be bounded by the file: read the data. The
     * block is over-allocated so every tensor can start ST_ALIGN-aligned. */
    st->data = pl__malloc(total + ST_ALIGN);
    if (!st->data) {
        fail(fn, label, PL_ERR_NOMEM, "out of memory for %zu bytes of tensor data", total);
        goto bad;
    }
    unsigned char *base =
        (unsigned char *)(((uintptr_t)st->data + ST_ALIGN - 1) & ~(uintptr_t)(ST_ALIGN - 1));
    size_t o = 0;
    bool le = host_is_le();
    /* A 16-bit tensor read from a file goes through one buffer, then is
     * widened into its float32 place. */
    size_t half_max = 0;
    for (int i = 0; i < st->n; i++)
        if (st_size(st->e[i].file_dtype) == 2 && (size_t)st->e[i].numel * 2 > half_max)
            half_max = (size_t)st->e[i].numel * 2;
    if (half_max && !src->mem && !(half = pl__malloc(half_max))) {
        fail(fn, label, PL_ERR_NOMEM, "out of memory for %zu bytes of 16-bit tensor data",
             half_max);
        goto bad;
    }
    for (int i = 0; i < st->n; i++) {
        pl_safetensors_entry *e = &st->e[i];
        size_t bytes = (size_t)e->numel * 4, fbytes = (size_t)(e->end - e->begin);
        bool wide = st_size(e->file_dtype) == 2;
        e->data = base + o;
        if (!bytes) continue;
        unsigned char *dst = wide ? half : base + o;
        const unsigned char *from = dst; /* the file's bytes of the tensor */
        if (src->mem) {
            from = src->mem + e->begin;
            if (!wide) memcpy(dst, from, fbytes);
        } else if (fseeko(src->f, (off_t)(src->base + e->begin), SEEK_SET) != 0 ||
                   fread(dst, 1, fbytes, src->f) != fbytes) {
            fail(fn, label, PL_ERR_IO, "reading tensor '%s' failed (file changed while read?)",
                 e->name);
            goto bad;
        }
        if (wide)
            half_to_f32(e->file_dtype, from, (float *)(base + o), (size_t)e->numel);
        else if (!le)
            swap32(base + o, (size_t)e->numel);
        o += round_up(bytes);
    }
    pl__free(half);
    pl__free(tmp);
    pl__free(keys_sorted);
    cJSON_Delete(root);
    return st;
bad:
    pl__free(half);
    pl__free(tmp);
    pl__free(keys_sorted);
    pl_safetensors_close(st);
    cJSON_Delete(root);
    return NULL;
}

static uint64_t rd_le64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

pl_safetensors *pl__safetensors_parse(const void *buf, size_t size, const char *label) {
    const char *fn = "pl_safetensors_parse";
    if (!label) label = "<memory>";
    if (!buf && size) {
        pl__err(PL_ERR_ARG, "%s: buf is NULL", fn);
        return NULL;
    }
    const unsigned char *b = buf;
    if (size < 8) {
        fail(fn, label, PL_ERR_FORMAT,
             "%zu bytes is too short: a safetensors file starts with an 8-byte header length",
             size);
        return NULL;
    }
    uint64_t n = rd_le64(b);
    if (!check_lengths(fn, label, size, n)) return NULL;
    st_source src = {NULL, 0, b + 8 + n};
    return parse_header(fn, label, (const char *)b + 8, (size_t)n, size - 8 - n, &src);
}

static pl_safetensors *open_file(const char *fn, const char *path) {
    if (!path) {
        pl__err(PL_ERR_ARG, "%s: path is NULL", fn);
        return NULL;
    }
    /* O_NONBLOCK: opening a FIFO must not wait for a writer; it is then
     * rejected as not a regular file (where O_NONBLOCK has no effect). */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        fail(fn, path, PL_ERR_IO, "cannot open: %s", strerror(errno));
        return NULL;
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        fail(fn, path, PL_ERR_IO, "not a regular file");
        close(fd);
        return NULL;
    }
    FILE *f = fdopen(fd, "rb");
    if (!f) {
        fail(fn, path, PL_ERR_IO, "cannot open: %s", strerror(errno));
        close(fd);
        return NULL;
    }
    pl_safetensors *st = NULL;
    char *json = NULL;
    unsigned char h8[8];
    uint64_t size = (uint64_t)sb.st_size;
    if (size < 8) {
        fail(fn, path, PL_ERR_FORMAT,
             "file is %llu bytes, too short: a safetensors file starts with an 8-byte header "
             "length",
             (unsigned long long)size);
        goto out;
    }
    if (fread(h8, 1, 8, f) != 8) {
        fail(fn, path, PL_ERR_IO, "reading the header length failed");
        goto out;
    }
    uint64_t n = rd_le64(h8);
    if (!check_lengths(fn, path, size, n)) goto out;
    if (!(json = pl__malloc((size_t)n))) {
        fail(fn, path, PL_ERR_NOMEM, "out of memory for a %llu-byte header", (unsigned long long)n);
        goto out;
    }
    if (fread(json, 1, (size_t)n, f) != (size_t)n) {
        fail(fn, path, PL_ERR_IO, "reading the %llu-byte header failed", (unsigned long long)n);
        goto out;
    }
    st_source src = {f, 8 + n, NULL};
    st = parse_header(fn, path, json, (size_t)n, size - 8 - n, &src);
out:
    pl__free(json);
    fclose(f);
    return st;
}

pl_safetensors *pl_safetensors_open(const char *path) {
    return open_file("pl_safetensors_open", path);
}

int pl_safetensors_count(const pl_safetensors *st) { return st ? st->n : 0; }

const pl_safetensors_entry *pl_safetensors_at(const pl_safetensors *st, int i) {
    return st && i >= 0 && i < st->n ? &st->e[i] : NULL;
}

const pl_safetensors_entry *pl_safetensors_get(const pl_safetensors *st, const char *name) {
    if (!st || !name) return NULL;
    int lo = 0, hi = st->n - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2, c = strcmp(st->by_name[mid]->name, name);
        if (!c) return st->by_name[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid - 1;
    }
    return NULL;
}

int pl_safetensors_meta_count(const pl_safetensors *st) { return st ? st->n_meta : 0; }
const char *pl_safetensors_meta_key(const pl_safetensors *st, int i) {
    return st && i >= 0 && i < st->n_meta ? st->meta_keys[i] : NULL;
}
const char *pl_safetensors_meta_value(const pl_safetensors *st, int i) {
    return st && i >= 0 && i < st->n_meta ? st->meta_values[i] : NULL;
}
const char *pl_safetensors_meta(const pl_safetensors *st, const char *key) {
    for (int i = 0; st && key && i < st->n_meta; i++)
        if (!strcmp(st->meta_keys[i], key)) return st->meta_values[i];
    return NULL;
}

pl_status pl_safetensors_meta_u64(const pl_safetensors *st, const char *key, uint64_t *out) {
    const char *fn = "pl_safetensors_meta_u64";
    if (!st || !key || !out) return pl__err(PL_ERR_ARG, "%s: st, key or out is NULL", fn);
    const char *v = pl_safetensors_meta(st, key);
    if (!v) return fail(fn, st->label, PL_ERR_FORMAT, "no metadata '%s'", key);
    uint64_t x = 0;
    bool ok = *v != 0;
    for (const char *p = v; ok && *p; p++) {
        unsigned dgt = (unsigned)(*p - '0');
        if (dgt > 9 || x > (UINT64_MAX - dgt) / 10)
            ok = false;
        else
            x = x * 10 + dgt;
    }
    if (!ok)
        return fail(fn, st->label, PL_ERR_FORMAT,
                    "metadata '%s' = '%.40s' is not a decimal integer in [0, 2^64)", key, v);
    *out = x;
    return PL_OK;
}

/* ------------------------------------------------------------------------ */
/* Saving                                                                    */

typedef struct {
    char *p;
    size_t n, cap;
    bool oom;
} sbuf;

static void sb_put(sbuf *b, const char *s, size_t n) {
    if (b->oom) return;
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n + 1) cap *= 2;
        char *p = pl__malloc(cap);
        if (!p) {
            b->oom = true;
            return;
        }
        if (b->p) memcpy(p, b->p, b->n);
        pl__free(b->p);
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}
static void sb_puts(sbuf *b, const char *s) { sb_put(b, s, strlen(s)); }
static void sb_u64(sbuf *b, uint64_t v) {
    char t[24];
    sb_put(b, t, (size_t)snprintf(t, sizeof t, "%llu", (unsigned long long)v));
}
/* A JSON string: quotes, backslashes and control bytes escaped; the rest
 * is UTF-8 already (checked). */
static void sb_json_str(sbuf *b, const char *s) {
    sb_put(b, "\"", 1);
    for (const char *p = s; *p; p++) {
        unsigned char c = (unsigned char)*p;
        if (c == '"' || c == '\\') {
            char esc[2] = {'\\', (char)c};
            sb_put(b, esc, 2);
        } else if (c < 0x20) {
            char esc[8];
            snprintf(esc, sizeof esc, "\\u%04x", c);
            sb_put(b, esc, 6);
        } else {
            sb_put(b, p, 1);
        }
    }
    sb_put(b, "\"", 1);
}

/* Writes len bytes of 32-bit words as little endian. */
static bool write_le32(FILE *f, const void *data, size_t bytes) {
    if (host_is_le()) return fwrite(data, 1, bytes, f) == bytes;
    unsigned char chunk[4096];
    const unsigned char *p = data;
    while (bytes) {
        size_t k = bytes < sizeof chunk ? bytes : sizeof chunk;
        memcpy(chunk, p, k);
        swap32(chunk, k / 4);
        if (fwrite(chunk, 1, k, f) != k) return false;
        p += k;
        bytes -= k;
    }
    return true;
}

/* Writes n floats as bfloat16, little endian (f32_to_bf16). */
static bool write_bf16(FILE *f, const float *x, size_t n) {
    unsigned char chunk[4096];
    while (n) {
        size_t k = n < sizeof chunk / 2 ? n : sizeof chunk / 2;
        for (size_t i = 0; i < k; i++) {
            uint16_t b = f32_to_bf16(x[i]);
            chunk[2 * i] = (unsigned char)(b & 0xffu);
            chunk[2 * i + 1] = (unsigned char)(b >> 8);
        }
        if (fwrite(chunk, 1, 2 * k, f) != 2 * k) return false;
        x += k;
        n -= k;
    }
    return true;
}

/* Validated arguments -> header -> temporary file -> rename over path. */
static pl_status save_impl(const char *fn, const char *path, const pl_tensor *const *tensors,
                           const char *const *names, int n, const char *const *mk,
                           const char *const *mv, int n_meta, unsigned flags) {
    if (!path || !*path) return pl__err(PL_ERR_ARG, "%s: path is NULL or empty", fn);
    if (flags & ~PL_SAVE_BF16)
        return pl__err(PL_ERR_ARG, "%s: unknown flags 0x%x (known: PL_SAVE_BF16)", fn,
                       flags & ~PL_SAVE_BF16);
    const bool bf16 = flags & PL_SAVE_BF16;
    if (n < 0 || n_meta < 0)
        return pl__err(PL_ERR_ARG, "%s: negative count (n = %d, n_meta = %d)", fn, n, n_meta);
    if (n > 0 && !tensors) return pl__err(PL_ERR_ARG, "%s: tensors is NULL", fn);
    if (n_meta > 0 && (!mk || !mv))
        return pl__err(PL_ERR_ARG, "%s: meta_keys or meta_values is NULL", fn);
    for (int i = 0; i < n; i++) {
        const pl_tensor *t = tensors[i];
        char arg[32];
        snprintf(arg, sizeof arg, "tensors[%d]", i);
        if (!t) return pl__err(PL_ERR_ARG, "%s: tensor %d is NULL", fn, i);
        if (pl__check_any(fn, arg, t, -1)) return pl_last_status();
        const char *nm = names ? names[i] : t->name;
        if (!nm || !*nm) return pl__err(PL_ERR_ARG, "%s: tensor %d has no name", fn, i);
        if (!valid_utf8(nm))
            return pl__err(PL_ERR_ARG, "%s: name of tensor %d is not valid UTF-8", fn, i);
        if (!strcmp(nm, "__metadata__"))
            return pl__err(PL_ERR_ARG, "%s: \"__metadata__\" cannot name a tensor", fn);
    }
    for (int i = 0; i < n_meta; i++) {
        if (!mk[i] || !mv[i])
            return pl__err(PL_ERR_ARG, "%s: metadata key or value %d is NULL", fn, i);
        if (!valid_utf8(mk[i]) || !valid_utf8(mv[i]))
            return pl__err(PL_ERR_ARG, "%s: metadata pair %d is not valid UTF-8", fn, i);
    }
    /* Duplicate names and keys. */
    int big = n > n_meta ? n : n_meta;
    const char **sorted = pl__malloc(((size_t)big + 1) * sizeof *sorted);
    if (!sorted) return pl_last_status();
    for (int pass = 0; pass < 2; pass++) {
        int m = pass ? n_meta : n;
        for (int i = 0; i < m; i++) sorted[i] = pass ? mk[i] : names ? names[i] : tensors[i]->name;
        qsort(sorted, (size_t)m, sizeof *sorted, cmp_str);
        for (int i = 1; i < m; i++)
            if (!strcmp(sorted[i], sorted[i - 1])) {
                pl__err(PL_ERR_ARG, "%s: two %s are named '%s'", fn,
                        pass ? "metadata keys" : "tensors", sorted[i]);
                pl__free(sorted);
                return PL_ERR_ARG;
            }
    }
    pl__free(sorted);

    /* Header: metadata first, then the tensors packed in the order given. */
    sbuf h = {0};
    sb_puts(&h, "{");
    if (n_meta) {
        sb_puts(&h, "\"__metadata__\":{");
        for (int i = 0; i < n_meta; i++) {
            if (i) sb_puts(&h, ",");
            sb_json_str(&h, mk[i]);
            sb_puts(&h, ":");
            sb_json_str(&h, mv[i]);
        }
        sb_puts(&h, "}");
    }
    uint64_t off = 0;
    for (int i = 0; i < n; i++) {
        const pl_tensor *t = tensors[i];
        if (i || n_meta) sb_puts(&h, ",");
        sb_json_str(&h, names ? names[i] : t->name);
        sb_puts(&h, ":{\"dtype\":\"");
        const bool narrow = bf16 && t->dtype == PL_F32; /* float32 tensors only */
        sb_puts(&h, narrow ? "BF16" : dtype_tag(t->dtype));
        sb_puts(&h, "\",\"shape\":[");
        for (int d = 0; d < t->ndim; d++) {
            if (d) sb_puts(&h, ",");
            sb_u64(&h, (uint64_t)t->shape[d]);
        }
        sb_puts(&h, "],\"data_offsets\":[");
        sb_u64(&h, off);
        sb_puts(&h, ",");
        off += (uint64_t)t->numel * (narrow ? 2 : 4);
        sb_u64(&h, off);
        sb_puts(&h, "]}");
    }
    sb_puts(&h, "}");
    /* Pad with spaces so the data section starts 8-byte aligned. */
    while (!h.oom && (8 + h.n) % 8) sb_puts(&h, " ");
    if (h.oom) {
        pl__free(h.p);
        return pl__err(PL_ERR_NOMEM, "%s: '%s': out of memory building the header", fn, path);
    }

    pl__atomic_file af;
    if (pl__atomic_begin(fn, path, &af)) {
        pl__free(h.p);
        return pl_last_status();
    }
    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)((uint64_t)h.n >> (8 * i));
    bool ok = fwrite(len8, 1, 8, af.f) == 8 && fwrite(h.p, 1, h.n, af.f) == h.n;
    for (int i = 0; ok && i < n; i++)
        ok = bf16 && tensors[i]->dtype == PL_F32
                 ? write_bf16(af.f, tensors[i]->data, (size_t)tensors[i]->numel)
                 : write_le32(af.f, tensors[i]->data, (size_t)tensors[i]->numel * 4);
    int write_err = ok ? 0 : errno ? errno : EIO;
    pl__free(h.p);
    return pl__atomic_commit(fn, path, &af, write_err);
}

pl_status pl_safetensors_save(const char *path, const pl_tensor *const *tensors,
                              const char *const *names, int n, const char *const *meta_keys,
                              const char *const *meta_values, int n_meta) {
    return save_impl("pl_safetensors_save", path, tensors, names, n, meta_keys, meta_values, n_meta,
                     0);
}

pl_status pl_safetensors_save_ex(const char *path, const pl_tensor *const *tensors,
                                 const char *const *names, int n, const char *const *meta_keys,
                                 const char *const *meta_values, int n_meta, unsigned flags) {
    return save_impl("pl_safetensors_save_ex", path, tensors, names, n, meta_keys, meta_values,
                     n_meta, flags);
}

/* ------------------------------------------------------------------------ */
/* Context checkpoints                                                       */

static pl_status checkpoint_save(const char *fn, pl_ctx *ctx, const char *path,
                                 const char *const *meta_keys, const char *const *meta_values,
                                 int n_meta, unsigned flags) {
    if (!ctx) return pl__err(PL_ERR_ARG, "%s: ctx is NULL", fn);
    const pl_tensor **ts = pl__malloc(((size_t)ctx->n_persist + 1) * sizeof *ts);
    if (!ts) return pl_last_status();
    int n = 0;
    for (int i = 0; i < ctx->n_persist; i++)
        if (ctx->persist[i]->name) ts[n++] = ctx->persist[i];
    pl_status s = save_impl(fn, path, ts, NULL, n, meta_keys, meta_values, n_meta, flags);
    pl__free(ts);
    return s;
}

pl_status pl_checkpoint_save(pl_ctx *ctx, const char *path, const char *const *meta_keys,
                             const char *const *meta_values, int n_meta) {
    return checkpoint_save("pl_checkpoint_save", ctx, path, meta_keys, meta_values, n_meta, 0);
}

pl_status pl_checkpoint_save_ex(pl_ctx *ctx, const char *path, const char *const *meta_keys,
                                const char *const *meta_values, int n_meta, unsigned flags) {
    return checkpoint_save("pl_checkpoint_save_ex", ctx, path, meta_keys, meta_values, n_meta,
                           flags);
}

static int cmp_tensor_name(const void *a, const void *b) {
    return strcmp((*(pl_tensor *const *)a)->name, (*(pl_tensor *const *)b)->name);
}

static pl_status restore_impl(const char *fn, pl_ctx *ctx, const pl_safetensors *st,
                              unsigned flags) {
    if (!ctx) return pl__err(PL_ERR_ARG, "%s: ctx is NULL", fn);
    if (!st) return pl__err(PL_ERR_ARG, "%s: st is NULL", fn);
    if (flags &
        ~(PL_CKPT_PARAMS_ONLY | PL_CKPT_ALLOW_MISSING | PL_CKPT_ALLOW_EXTRA | PL_CKPT_CREATE_EXTRA))
        return pl__err(PL_ERR_ARG, "%s: unknown flags 0x%x", fn, flags);
    /* With PARAMS_ONLY an "extra" tensor may be a non-parameter the context
     * has already: creating it would make a second tensor of that name. */
    if ((flags & PL_CKPT_CREATE_EXTRA) && (flags & PL_CKPT_PARAMS_ONLY))
        return pl__err(PL_ERR_ARG,
                       "%s: PL_CKPT_CREATE_EXTRA cannot be combined with PL_CKPT_PARAMS_ONLY", fn);
    const char *label = st->label;
    pl_tensor **ts = pl__malloc(((size_t)ctx->n_persist + 1) * sizeof *ts);
    if (!ts) return pl_last_status();
    int n = 0;
    for (int i = 0; i < ctx->n_persist; i++) {
        pl_tensor *t = ctx->persist[i];
        if (t->name && (!(flags & PL_CKPT_PARAMS_ONLY) || t->requires_grad)) ts[n++] = t;
    }
    qsort(ts, (size_t)n, sizeof *ts, cmp_tensor_name);
    pl_status s = PL_OK;
    char b1[96], b2[96];
    for (int i = 0; i < n && !s; i++) {
        if (i && !strcmp(ts[i]->name, ts[i - 1]->name)) {
            s = pl__err(PL_ERR_ARG, "%s: two tensors of the context are named '%s'", fn,
                        ts[i]->name);
            break;
        }
        const pl_safetensors_entry *e = pl_safetensors_get(st, ts[i]->name);
        if (!e) {
            if (!(flags & PL_CKPT_ALLOW_MISSING))
                s = fail(fn, label, PL_ERR_FORMAT,
                         "has no tensor '%s' (PL_CKPT_ALLOW_MISSING keeps the current value)",
                         ts[i]->name);
            continue;
        }
        if (e->dtype != ts[i]->dtype) {
            s = fail(fn, label, PL_ERR_DTYPE, "tensor '%s' is %s in the file but %s in the context",
                     e->name, st_dtype_tag(e->file_dtype), dtype_tag(ts[i]->dtype));
            break;
        }
        bool same = e->ndim == ts[i]->ndim;
        for (int d = 0; same && d < e->ndim; d++) same = e->shape[d] == ts[i]->shape[d];
        if (!same) {
            uint64_t dims[PL_MAX_DIMS];
            for (int d = 0; d < e->ndim; d++) dims[d] = (uint64_t)e->shape[d];
            s = fail(fn, label, PL_ERR_SHAPE,
                     "tensor '%s' has shape %s in the file but %s in the context", e->name,
                     dims_str(dims, e->ndim, b1, sizeof b1), pl_shape_str(ts[i], b2, sizeof b2));
        }
    }
    /* File tensors that match no target: an error, ignored, or created. */
    bool create = flags & PL_CKPT_CREATE_EXTRA;
    int n_new = 0;
    for (int i = 0; !s && (create || !(flags & PL_CKPT_ALLOW_EXTRA)) && i < st->n; i++) {
        const pl_safetensors_entry *e = &st->e[i];
        pl_tensor key_t = {.name = e->name};
        pl_tensor *key = &key_t;
        if (bsearch(&key, ts, (size_t)n, sizeof *ts, cmp_tensor_name)) continue;
        if (!create) {
            s = fail(fn, label, PL_ERR_FORMAT,
                     "tensor '%s' matches no %s of the context (PL_CKPT_ALLOW_EXTRA ignores it)",
                     e->name,
                     flags & PL_CKPT_PARAMS_ONLY ? "parameter" : "named persistent tensor");
            break;
        }
        /* Context tensors have 1 to PL_MAX_DIMS dims, each >= 1. */
        bool ok = e->ndim >= 1;
        for (int d = 0; ok && d < e->ndim; d++) ok = e->shape[d] >= 1;
        if (!ok) {
            uint64_t dims[PL_MAX_DIMS];
            for (int d = 0; d < e->ndim; d++) dims[d] = (uint64_t)e->shape[d];
            s = fail(fn, label, PL_ERR_SHAPE,
                     "tensor '%s' of shape %s cannot become a context tensor (needs >= 1 dim, "
                     "each >= 1)",
                     e->name, dims_str(dims, e->ndim, b1, sizeof b1));
            break;
        }
        n_new++;
    }
    /* Everything matched: only now change the context. New tensors first, as
     * they can fail (out of memory); then they are removed again. */
    if (!s && create && n_new) {
        pl_tensor **made = pl__malloc((size_t)n_new * sizeof *made);
        int k = 0;
        for (int i = 0; made && i < st->n && k >= 0; i++) {
            const pl_safetensors_entry *e = &st->e[i];
            pl_tensor key_t = {.name = e->name};
            pl_tensor *key = &key_t;
            if (bsearch(&key, ts, (size_t)n, sizeof *ts, cmp_tensor_name)) continue;
            pl_tensor *t = pl_persistent_new(ctx, e->name, e->dtype, e->ndim, e->shape, false);
            if (!t) {
                while (k > 0) pl_tensor_free(made[--k]);
                k = -1;
                break;
            }
            memcpy(t->data, e->data, (size_t)e->numel * 4);
            made[k++] = t;
        }
        if (!made || k < 0)
            s = fail(fn, label, PL_ERR_NOMEM, "out of memory creating the file's extra tensors");
        pl__free(made);
    }
    for (int i = 0; !s && i < n; i++) {
        const pl_safetensors_entry *e = pl_safetensors_get(st, ts[i]->name);
        if (e) memcpy(ts[i]->data, e->data, (size_t)e->numel * 4);
    }
    pl__free(ts);
    return s;
}

pl_status pl_checkpoint_restore(pl_ctx *ctx, const pl_safetensors *st, unsigned flags) {
    return restore_impl("pl_checkpoint_restore", ctx, st, flags);
}

pl_status pl_checkpoint_load(pl_ctx *ctx, const char *path, unsigned flags) {
    const char *fn = "pl_checkpoint_load";
    if (!ctx) return pl__err(PL_ERR_ARG, "%s: ctx is NULL", fn);
    pl_safetensors *st = open_file(fn, path);
    if (!st) return pl_last_status();
    pl_status s = restore_impl(fn, ctx, st, flags);
    pl_safetensors_close(st);
    return s;
}
