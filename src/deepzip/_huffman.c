/* deepzip._huffman: the compiled canonical Huffman decoder (c/huffman.h, the one the C
 * reader uses). Optional: deepzip/huffman.py falls back to bitarray where it was not
 * built. It decodes into a NumPy array the caller made, with the GIL released, at a few
 * nanoseconds a symbol where bitarray's iterator through np.fromiter takes about 35.
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

static PyMethodDef methods[] = {
    {"decode", decode, METH_VARARGS,
     "decode(data, nbits, count, counts, order, out): canonical Huffman decoding into out."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_huffman",
    "The compiled canonical Huffman decoder shared with deepzip's C reader.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__huffman(void) { return PyModule_Create(&module); }
