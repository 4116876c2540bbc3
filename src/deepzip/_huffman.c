/* deepzip._huffman: canonical Huffman coding compiled, the per-symbol floor of saving
 * and loading a file. Decoding is c/huffman.h, the C reader's decoder, into a NumPy
 * array the caller made, at a few nanoseconds a symbol where bitarray's iterator through
 * np.fromiter takes about 35; encoding writes the code words into a buffer the caller
 * sized. Both release the GIL. Optional: deepzip/huffman.py falls back to bitarray and
 * NumPy where it was not built.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "huffman.h"

/* decode(data, nbits, count, counts, order, out): counts holds 16 ints (index = code
 * length, index 0 unused), order the symbols in canonical order, out a writable
 * contiguous buffer of count unsigned integers of 1, 2, 4 or 8 bytes. Raises
 * ValueError with the reader's message on a corrupt stream. */
static PyObject *decode(PyObject *self, PyObject *args) {
    Py_buffer data, out;
    long long nbits, count;
    PyObject *counts_obj, *order_obj, *counts_seq = NULL, *order_seq = NULL;
    int counts[DZ_HUFF_MAX + 1] = {0};
    int *order = NULL, status = DZ_HUFF_OK, ok = 0;
    Py_ssize_t used, i;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*LLOOw*", &data, &nbits, &count, &counts_obj, &order_obj,
                          &out))
        return NULL;
    counts_seq = PySequence_Fast(counts_obj, "counts must be a sequence");
    if (counts_seq == NULL) goto done;
    order_seq = PySequence_Fast(order_obj, "order must be a sequence");
    if (order_seq == NULL) goto done;
    if (PySequence_Fast_GET_SIZE(counts_seq) != DZ_HUFF_MAX + 1) {
        PyErr_SetString(PyExc_ValueError, "counts must hold 16 entries");
        goto done;
    }
    for (i = 0; i <= DZ_HUFF_MAX; i++) {
        long v = PyLong_AsLong(PySequence_Fast_GET_ITEM(counts_seq, i));
        if (v == -1 && PyErr_Occurred()) goto done;
        counts[i] = v < 0 || v > (1L << DZ_HUFF_MAX) ? -1 : (int)v;
    }
    used = PySequence_Fast_GET_SIZE(order_seq);
    if (used > (1L << DZ_HUFF_MAX)) {
        PyErr_SetString(PyExc_ValueError, dz_huff_error(DZ_HUFF_CODE));
        goto done;
    }
    order = PyMem_Malloc((size_t)(used ? used : 1) * sizeof *order);
    if (order == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (i = 0; i < used; i++) {
        long v = PyLong_AsLong(PySequence_Fast_GET_ITEM(order_seq, i));
        if (v == -1 && PyErr_Occurred()) goto done;
        if (v < 0 || v > INT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "symbols must be non-negative integers");
            goto done;
        }
        order[i] = (int)v;
    }
    if (!(out.itemsize == 1 || out.itemsize == 2 || out.itemsize == 4 || out.itemsize == 8)
        || count < 0 || out.len != count * out.itemsize) {
        PyErr_SetString(PyExc_ValueError, "out must hold count integers of 1, 2, 4 or 8 bytes");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    status = dz_huff_decode((const uint8_t *)data.buf, (size_t)data.len, nbits, count, counts,
                            order, (int)used, out.buf, (int)out.itemsize);
    Py_END_ALLOW_THREADS
    if (status != DZ_HUFF_OK)
        PyErr_SetString(PyExc_ValueError, dz_huff_error(status));
    else
        ok = 1;
done:
    PyMem_Free(order);
    Py_XDECREF(counts_seq);
    Py_XDECREF(order_seq);
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

/* encode(symbols, lengths, codes, out) -> bits: symbols a contiguous buffer of unsigned
 * (or non-negative) integers of 1, 2, 4 or 8 bytes; lengths (uint8) and codes (uint16)
 * each symbol's code word; out a writable buffer of at least the bytes they need. */
static PyObject *encode(PyObject *self, PyObject *args) {
    Py_buffer syms, lengths, codes, out;
    const uint8_t *len_of;
    const uint16_t *code_of;
    uint8_t *dst;
    uint64_t acc = 0, sym;
    int have = 0, bad = 0, width;
    Py_ssize_t n, i, at = 0, alphabet;
    long long nbits = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*y*w*", &syms, &lengths, &codes, &out)) return NULL;
    width = (int)syms.itemsize;
    alphabet = lengths.len;
    if (!(width == 1 || width == 2 || width == 4 || width == 8) || codes.itemsize != 2 ||
        codes.len != 2 * alphabet) {
        PyErr_SetString(PyExc_ValueError, "symbols must be integers; codes uint16 per length");
        goto done;
    }
    n = syms.len / width;
    len_of = (const uint8_t *)lengths.buf;
    code_of = (const uint16_t *)codes.buf;
    dst = (uint8_t *)out.buf;
    Py_BEGIN_ALLOW_THREADS
    for (i = 0; i < n; i++) {
        int len;
        switch (width) {
        case 1: sym = ((const uint8_t *)syms.buf)[i]; break;
        case 2: sym = ((const uint16_t *)syms.buf)[i]; break;
        case 4: sym = ((const uint32_t *)syms.buf)[i]; break;
        default: sym = ((const uint64_t *)syms.buf)[i]; break;
        }
        if (sym >= (uint64_t)alphabet || (len = len_of[sym]) == 0 || len > DZ_HUFF_MAX) {
            bad = 1;
            break;
        }
        acc = acc << len | code_of[sym];
        have += len;
        nbits += len;
        while (have >= 8) {
            if (at >= out.len) {
                bad = 2;
                break;
            }
            have -= 8;
            dst[at++] = (uint8_t)(acc >> have);
        }
        if (bad) break;
    }
    if (!bad && have) {
        if (at >= out.len)
            bad = 2;
        else
            dst[at++] = (uint8_t)(acc << (8 - have));
    }
    Py_END_ALLOW_THREADS
    if (bad)
        PyErr_SetString(PyExc_ValueError, bad == 1 ? "symbol without a Huffman code"
                                                   : "output buffer too small");
done:
    PyBuffer_Release(&syms);
    PyBuffer_Release(&lengths);
    PyBuffer_Release(&codes);
    PyBuffer_Release(&out);
    if (PyErr_Occurred()) return NULL;
    return PyLong_FromLongLong(nbits);
}

static PyMethodDef methods[] = {
    {"decode", decode, METH_VARARGS,
     "decode(data, nbits, count, counts, order, out): canonical Huffman decoding into out."},
    {"encode", encode, METH_VARARGS,
     "encode(symbols, lengths, codes, out) -> bits: canonical Huffman coding into out."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_huffman",
    "Canonical Huffman coding compiled; decoding shared with deepzip's C reader.", -1,
    methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__huffman(void) { return PyModule_Create(&module); }
