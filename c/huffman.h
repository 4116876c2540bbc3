/* huffman.h: canonical Huffman decoding, shared by the C reader (dzip.c) and the Python
 * package's compiled decoder (src/deepzip/_huffman.c), so that both read a stream the
 * same way and refuse the same corrupt ones.
 *
 * A code is given as count[len], the number of code words of each length 1..15, and
 * order[], the symbols in canonical order (shorter codes first, ties by symbol value, as
 * in DEFLATE and deepzip/huffman.py). Codes of one length are consecutive integers, so
 * a code word is found by comparing the next 15 bits, left-justified, with the end of
 * each length's code words; a table of the next 10 bits finds the short ones at once.
 */
#ifndef DZIP_HUFFMAN_H
#define DZIP_HUFFMAN_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define DZ_HUFF_MAX 15
#define DZ_HUFF_FAST 10  /* code words up to this long are looked up in one step */

enum {
    DZ_HUFF_OK = 0,
    DZ_HUFF_SIZES,      /* nbits beyond the data, or more symbols than bits */
    DZ_HUFF_CODE,       /* count[] and order[] are no prefix code */
    DZ_HUFF_SHORT,      /* the stream ends inside a code word */
    DZ_HUFF_NO_WORD,    /* a bit pattern that is no code word */
    DZ_HUFF_LEFT_OVER   /* bits left after the last symbol */
};

/* The message of a status, as the Python reader words it. */
static const char *dz_huff_error(int status) {
    switch (status) {
    case DZ_HUFF_SIZES: return "Huffman stream sizes are inconsistent";
    case DZ_HUFF_CODE: return "bad Huffman code lengths";
    case DZ_HUFF_SHORT: return "corrupt Huffman stream (too short)";
    case DZ_HUFF_NO_WORD: return "corrupt Huffman stream (no such code word)";
    case DZ_HUFF_LEFT_OVER: return "corrupt Huffman stream (bits left over)";
    default: return "Huffman stream decoded";
    }
}

/* Exactly n symbols from exactly nbits bits of p[0..size), most significant bit first,
 * into out as unsigned integers of width bytes (1, 2, 4 or 8); order[] has used entries.
 * Returns DZ_HUFF_OK or the first problem found; out is then partly written. */
static int dz_huff_decode(const uint8_t *p, size_t size, int64_t nbits, int64_t n,
                          const int count[DZ_HUFF_MAX + 1], const int *order, int used,
                          void *out, int width) {
    uint32_t limit[DZ_HUFF_MAX + 2];   /* left-justified end of each length's code words */
    int64_t offset[DZ_HUFF_MAX + 1];   /* order index of a length's code word 0 */
    uint32_t fast[1 << DZ_HUFF_FAST];  /* (length << 16 | order index) by prefix; 0: none */
    uint64_t buf = 0;                  /* the next bits, left-aligned */
    int have = 0, len, k = 0;
    int64_t code = 0, pos = 0, i;
    size_t at = 0, end;
    if (nbits < 0 || (uint64_t)nbits > 8 * (uint64_t)size || n < 0 ||
        n > (nbits > 0 ? nbits : 0))
        return DZ_HUFF_SIZES;
    for (len = 1; len <= DZ_HUFF_MAX; len++) {
        if (count[len] < 0 || count[len] > (1 << len) - code) return DZ_HUFF_CODE;
        offset[len] = k - code;
        code += count[len];
        k += count[len];
        limit[len] = (uint32_t)(code << (DZ_HUFF_MAX - len));
        code <<= 1;
    }
    if (k != used) return DZ_HUFF_CODE;
    memset(fast, 0, sizeof fast);
    for (len = 1, k = 0; len <= DZ_HUFF_FAST; k += count[len], len++) {
        /* the prefixes that start a code word of this length, and the word each gives */
        uint32_t lo = len > 1 ? limit[len - 1] : 0, j;
        for (j = lo >> (DZ_HUFF_MAX - DZ_HUFF_FAST);
             j < limit[len] >> (DZ_HUFF_MAX - DZ_HUFF_FAST); j++)
            fast[j] = (uint32_t)len << 16 |
                      (uint32_t)(k + (((j << (DZ_HUFF_MAX - DZ_HUFF_FAST)) - lo) >>
                                      (DZ_HUFF_MAX - len)));
    }
    limit[DZ_HUFF_MAX + 1] = UINT32_MAX;  /* a sentinel: no code word past the last */
    end = (size_t)((nbits + 7) / 8);
    for (i = 0; i < n; i++) {
        uint32_t peek, hit;
        int64_t sym;
        while (have <= 56 && at < end) {
            buf |= (uint64_t)p[at++] << (56 - have);
            have += 8;
        }
        peek = (uint32_t)(buf >> (64 - DZ_HUFF_MAX));
        hit = fast[peek >> (DZ_HUFF_MAX - DZ_HUFF_FAST)];
        if (hit) {
            len = (int)(hit >> 16);
            sym = order[hit & 0xffff];
        } else {
            for (len = DZ_HUFF_FAST + 1; peek >= limit[len]; len++) {}
            if (len > DZ_HUFF_MAX) return DZ_HUFF_NO_WORD;
            sym = order[offset[len] + (peek >> (DZ_HUFF_MAX - len))];
        }
        if (pos + len > nbits) return DZ_HUFF_SHORT;
        switch (width) {
        case 1: ((uint8_t *)out)[i] = (uint8_t)sym; break;
        case 2: ((uint16_t *)out)[i] = (uint16_t)sym; break;
        case 4: ((uint32_t *)out)[i] = (uint32_t)sym; break;
        default: ((uint64_t *)out)[i] = (uint64_t)sym; break;
        }
        buf <<= len;
        have -= len;
        pos += len;
    }
    return pos == nbits ? DZ_HUFF_OK : DZ_HUFF_LEFT_OVER;
}

#endif
