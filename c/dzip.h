/* dzip.h: a reader of deepzip's .dzip files (format versions 2 to 5) in C99.
 *
 * No dependency beyond the C library: the header's zlib stream, its JSON, the canonical
 * Huffman streams and every tensor layout are decoded here, from a buffer the caller
 * owns. Every size and offset read from the file is checked before anything is
 * allocated or sliced, as the Python reader checks them (docs/format.md, "What a reader
 * must check"); a file that fails a check is refused with a one-line reason.
 *
 *     dzip_file f;
 *     if (dzip_read(bytes, size, &f) != 0) { fprintf(stderr, "%s\n", f.error); ... }
 *     for (size_t i = 0; i < f.count; i++) use(f.tensors[i].name, f.tensors[i].data, ...);
 *     dzip_free(&f);
 *
 * Every tensor comes back as float32 values (an integer or bool tensor's values too,
 * converted as NumPy's astype does), in C order, with its name, shape and the dtype the
 * file declares. Compile with -ffp-contract=off: grid values are lo + q * step in
 * float32, and a fused multiply-add would round them differently from the writer.
 */
#ifndef DZIP_H
#define DZIP_H

#include <stddef.h>
#include <stdint.h>

#define DZIP_MAX_DIMS 8

typedef struct {
    char *name;                    /* the state_dict key, NUL-terminated */
    char dtype[12];                /* the declared dtype: float32, float16, bfloat16, ... */
    int ndim;
    int64_t shape[DZIP_MAX_DIMS];
    int64_t numel;
    float *data;                   /* numel values (NULL when numel is 0) */
} dzip_tensor;

typedef struct {
    int version;                   /* the file's format version */
    size_t count;
    dzip_tensor *tensors;          /* in the order of the file's entries */
    char arch[128];                /* the recorded architecture, or "" */
    char error[200];               /* why dzip_read refused the file */
} dzip_file;

/* Decode the .dzip file held in buf[0..len). Returns 0 and fills *out, or returns -1 with
 * out->error set and nothing left allocated. */
int dzip_read(const uint8_t *buf, size_t len, dzip_file *out);

/* Free what dzip_read allocated (safe on a refused or zeroed dzip_file). */
void dzip_free(dzip_file *f);

#endif
