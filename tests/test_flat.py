"""FlatParams refuses what it cannot hold faithfully, with a TypeError or ValueError that
names the argument, the value and what was expected, instead of casting, truncating or
failing deep inside NumPy (or importing CuPy). Views, alignment and one-launch steps of a
flat buffer on the GPU: tests/test_gpu.py."""
from __future__ import annotations

import numpy as np
import pytest

import hwoptim
from hwoptim import FlatParams, backends
from hwoptim.testing import random_values


def raises(exc, fn, *fragments):
    """``fn()`` raises exactly ``exc``, with every fragment in its message."""
    with pytest.raises(Exception) as info:
        fn()
    assert type(info.value) is exc, f"{type(info.value).__name__}: {info.value}"
    for f in fragments:
        assert f in str(info.value), f"{f!r} not in message {str(info.value)!r}"


# ----------------------------------------------------------------------------- from_arrays

def test_from_arrays_refuses_mixed_dtypes(rng):
    a = random_values(rng, (3, 4), np.float32)
    b = random_values(rng, (5,), np.float64)
    raises(TypeError, lambda: FlatParams.from_arrays([a, b]),
           "arrays[1]", "float64", "arrays[0]", "float32", "one dtype")
    raises(TypeError, lambda: FlatParams.from_arrays([b, b, a]), "arrays[2]", "float32")
    flat = FlatParams.from_arrays([a, a])             # one dtype: copies, not casts
    assert flat.dtype == np.float32
    assert all(np.array_equal(v, a) for v in flat.views)


def test_from_arrays_refuses_non_float_dtypes(rng):
    a = random_values(rng, (3,))
    for dtype in (np.int64, np.int32, np.longdouble, np.complex128, np.bool_):
        bad = np.ones(4, dtype)
        raises(TypeError, lambda: FlatParams.from_arrays([a, bad]),
               "arrays[1]", f"dtype {np.dtype(dtype)}",
               "expected float32, float64, float16 or bfloat16")
        raises(TypeError, lambda: FlatParams.from_arrays([bad]), "arrays[0]",
               f"dtype {np.dtype(dtype)}")


def test_from_arrays_refuses_what_is_not_an_array(rng):
    a = random_values(rng, (3,))
    raises(TypeError, lambda: FlatParams.from_arrays([[1.0, 2.0]]),
           "arrays[0]", "list", "expected a NumPy or CuPy array")
    raises(TypeError, lambda: FlatParams.from_arrays([a, 2.0]), "arrays[1]", "float")
    raises(TypeError, lambda: FlatParams.from_arrays([a, np.float64(2.0)]),
           "arrays[1]", "numpy.float64")
    raises(TypeError, lambda: FlatParams.from_arrays([a, None]), "arrays[1]", "NoneType")
    raises(TypeError, lambda: FlatParams.from_arrays(None), "arrays is", "NoneType",
           "expected a list of arrays")
    # one array is not a list of its rows
    raises(TypeError, lambda: FlatParams.from_arrays(np.ones((3, 2))),
           "arrays is a NumPy array", "(3, 2)", "[array]")


def test_from_arrays_refuses_an_empty_list():
    raises(ValueError, lambda: FlatParams.from_arrays([]), "arrays is empty",
           "at least one array")
    raises(ValueError, lambda: FlatParams.from_arrays(iter(())), "arrays is empty")


def test_from_arrays_refuses_an_xp_that_is_not_numpy_or_cupy(rng):
    a = random_values(rng, (3,))
    for bad in ("numpy", np.random, hwoptim, 1):
        raises(TypeError, lambda: FlatParams.from_arrays([a], xp=bad),
               f"xp={bad!r}", "expected the numpy or the cupy module")
    flat = FlatParams.from_arrays([a], xp=np)
    assert type(flat.params) is np.ndarray and np.array_equal(flat.views[0], a)


@pytest.mark.skipif("cupy" not in backends.available(), reason="needs CuPy and a GPU")
def test_from_arrays_never_moves_arrays_across_devices(rng):
    import cupy
    a = random_values(rng, (3,))
    raises(TypeError, lambda: FlatParams.from_arrays([a], xp=cupy), "xp=cupy",
           "NumPy array", "xp=None")
    raises(TypeError, lambda: FlatParams.from_arrays([cupy.asarray(a)], xp=np), "xp=numpy",
           "CuPy array")
    raises(TypeError, lambda: FlatParams.from_arrays([cupy.asarray(a), a]),
           "arrays[1] is a NumPy array", "arrays[0] is a CuPy array")
    flat = FlatParams.from_arrays([cupy.asarray(a)])
    assert isinstance(flat.params, cupy.ndarray) and np.array_equal(flat.views[0].get(), a)


# ----------------------------------------------------------------------------- the constructor

@pytest.mark.parametrize("shape", [(2.5,), (3, 2.0), (True,), (np.bool_(True), 2),
                                   ("3",), "3", (None,), None, (np.float64(3.0),)],
                         ids=repr)
def test_shapes_with_non_integer_dims_are_refused(shape):
    raises(TypeError, lambda: FlatParams([(4,), shape]), f"shapes[1]={shape!r}",
           "expected a shape, a tuple of ints")


def test_shapes_of_ints_and_numpy_integers_are_accepted():
    dims = [(2, 3), [np.int64(4)], np.int32(5), 7, (), (np.uint8(0),)]
    flat = FlatParams(dims, np.float64)
    assert flat.shapes == [(2, 3), (4,), (5,), (7,), (), (0,)]
    assert all(type(d) is int for s in flat.shapes for d in s)
    assert [v.shape for v in flat.views] == flat.shapes
    with pytest.raises(TypeError):                    # and a float is still refused
        FlatParams([(2, 3.0)])


@pytest.mark.parametrize("shapes", [None, 3, 2.5, "abc"], ids=repr)
def test_shapes_that_are_not_a_list_of_shapes_are_refused(shapes):
    raises(TypeError, lambda: FlatParams(shapes), f"shapes={shapes!r}",
           "expected a list of shapes")


@pytest.mark.parametrize("dtype, shown", [("x", "'x'"), (None, "None")], ids=repr)
def test_dtype_that_is_not_a_dtype_is_refused(dtype, shown):
    """Named, instead of NumPy's "data type 'x' not understood"; None is not float64."""
    raises(TypeError, lambda: FlatParams([(3,)], dtype), f"dtype={shown}",
           "expected float32, float64, float16 or bfloat16")


@pytest.mark.parametrize("xp", [None, "numpy", np.linalg], ids=["None", "str", "np.linalg"])
def test_xp_that_is_not_numpy_or_cupy_is_refused(xp):
    raises(TypeError, lambda: FlatParams([(3,)], xp=xp), f"xp={xp!r}",
           "expected the numpy or the cupy module")


def test_repr_counts_arrays_in_the_singular_and_plural():
    assert repr(FlatParams([(3,)])) == "FlatParams(1 array, 4 elements, float32)"
    assert repr(FlatParams([(3,), (2, 2)], np.float64)) == (
        "FlatParams(2 arrays, 8 elements, float64)")
