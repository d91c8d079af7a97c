"""Storage formats: which dtype each buffer is kept in, apart from the math.

A rule's spec is written once, in one arithmetic. A *format* says how the buffers it reads
and writes are stored: params and grads in ``float16``/``bfloat16`` (NumPy arrays with the
``ml_dtypes`` dtypes) besides float32/float64, state buffers in float32 or bfloat16, an
optional float32 master copy of the params, and round-to-nearest or stochastic rounding
when a result is stored into 16 bits. The code generator does the rest: load, convert to
the compute dtype (float32 for 16-bit params, else the params' dtype), the rule's math,
round and store. No rule's math is ever written per format.

This module holds the format itself and the NumPy reference of every conversion; the
compiled kernels print the same operations, bit for bit (tests compare them).

Stochastic rounding (``stochastic_rounding=True``) rounds a float32 ``x`` to one of its two
16-bit neighbours ``lo <= x <= hi``, to ``hi`` with probability ``(x - lo) / (hi - lo)``.
The random bits come from a counter-based generator: :func:`sr_key` turns ``(seed, step,
tensor)`` into a 32-bit key on the host, and element ``i`` of that tensor draws
``mix32((i mod 2**32) ^ key ^ mix32(i >> 32))`` (:func:`mix32`, a bijective 32-bit
integer hash), so every backend draws the same bits and a run resumes bit-identically.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PARAM_DTYPES = ("float16", "bfloat16", "float32", "float64")
STATE_DTYPES = ("float32", "bfloat16", "int8")
BLOCK = 256              # int8 state: elements per block (one float32 absmax each)
MIN_8BIT_SIZE = 4096     # int8 state: smaller arrays keep float32 state (as bitsandbytes)
SIXTEEN = ("float16", "bfloat16")
_M32 = 0xFFFFFFFF


def np_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a storage name (``bfloat16``: ``ml_dtypes.bfloat16``)."""
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def dtype_name(dtype) -> str | None:
    """The storage name of a NumPy dtype, or ``None`` if it is not one hwoptim stores."""
    dt = np.dtype(dtype)
    if dt.name in ("float16", "float32", "float64"):
        return dt.name
    if dt.name == "bfloat16" and dt.kind == "V":          # ml_dtypes' bfloat16
        return "bfloat16"
    return None


@dataclass(frozen=True)
class Format:
    """How one optimizer's buffers are stored: ``param`` (params and grads), ``state``
    (state buffers), ``master`` (a float32 copy of the params is what the rule updates),
    ``sr`` (stochastic rounding of the params into 16 bits)."""
    param: str
    state: str
    master: bool = False
    sr: bool = False

    @property
    def compute(self) -> str:
        """The dtype the math runs in."""
        return "float64" if self.param == "float64" else "float32"

    @property
    def plain(self) -> bool:
        """Every buffer in the compute dtype, no master copy, no stochastic rounding: what
        the kernels did before formats existed (and print exactly as then)."""
        return self.param == self.state == self.compute and not (self.master or self.sr)

    @property
    def key(self) -> str:
        """A name for caches and file names; the params' dtype itself when plain."""
        if self.plain:
            return self.param
        return (f"{self.param}_s{self.state}" + ("_master" if self.master else "")
                + ("_sr" if self.sr else ""))

    @property
    def extras(self) -> tuple:
        """Buffers the kernels take after the rule's own (and, for int8 state, after each
        state's ``<name>_absmax``): ``master`` (float32, the params' master copy),
        ``_srkey`` (uint32, one element: the tensor's stochastic-rounding key for this
        step)."""
        return (("master",) if self.master else ()) + (("_srkey",) if self.sr else ())

    @property
    def quantized(self) -> bool:
        return self.state == "int8"

    def arrays(self, plan_arrays) -> tuple:
        """The kernels' array arguments for a plan's arrays (param, grad, states)."""
        absmax = tuple(f"{a}_absmax" for a in plan_arrays[2:]) if self.quantized else ()
        return tuple(plan_arrays) + absmax + self.extras

    def storage(self, name: str) -> str:
        """The storage dtype name of buffer ``name`` (``param``, ``grad``, a state)."""
        if name in ("param", "grad"):
            return self.param
        if name == "master" or name.endswith("_absmax"):
            return self.compute
        if name == "_srkey":
            return "uint32"
        return "uint8" if self.quantized else self.state

    @classmethod
    def parse(cls, key) -> "Format":
        """The format named by ``key`` (a :attr:`key`, or a plain dtype name)."""
        if isinstance(key, Format):
            return key
        key = str(key)
        if key in PARAM_DTYPES:
            return make(key)
        parts = key.split("_")
        return cls(parts[0], parts[1][1:], "master" in parts[2:], "sr" in parts[2:])


def make(param: str, state_dtype=None, master_weights: bool = False,
         stochastic_rounding: bool = False, where: str = "") -> Format:
    """The format for params of dtype ``param`` with the optimizer's options, checked
    (errors name the argument and what was expected)."""
    if param not in PARAM_DTYPES:
        raise TypeError(f"{where}params have dtype {param}; expected one of "
                        f"{', '.join(PARAM_DTYPES)}")
    if state_dtype is not None:
        state_dtype = dtype_name(state_dtype) if not isinstance(state_dtype, str) \
            else state_dtype
    if state_dtype is not None and state_dtype not in STATE_DTYPES:
        raise ValueError(f"{where}state_dtype={state_dtype!r} is invalid: expected None, "
                         f"{', '.join(repr(s) for s in STATE_DTYPES)}")
    for name, v in (("master_weights", master_weights),
                    ("stochastic_rounding", stochastic_rounding)):
        if not isinstance(v, (bool, np.bool_)):
            raise TypeError(f"{where}{name}={v!r}: expected True or False")
    sixteen = param in SIXTEEN
    if (master_weights or stochastic_rounding) and not sixteen:
        which = "master_weights" if master_weights else "stochastic_rounding"
        raise ValueError(f"{where}{which}=True needs 16-bit params (float16 or bfloat16); "
                         f"these are {param}")
    if master_weights and stochastic_rounding:
        raise ValueError(f"{where}master_weights=True and stochastic_rounding=True: expected "
                         f"one of them (with a float32 master copy the params are rounded "
                         f"to nearest from it; nothing accumulates in 16 bits)")
    if param == "float64" and state_dtype is not None:
        raise ValueError(f"{where}state_dtype={state_dtype!r} with float64 params: expected "
                         f"None (float64 state)")
    compute = "float64" if param == "float64" else "float32"
    return Format(param, state_dtype or compute, bool(master_weights),
                  bool(stochastic_rounding))


# ----------------------------------------------------------------------------- random bits

def mix32(x):
    """A bijective 32-bit integer hash ("lowbias32": xorshift-multiply, twice), on Python
    ints or NumPy unsigned arrays (computed in uint64, masked to 32 bits)."""
    x = np.asarray(x, dtype=np.uint64) & np.uint64(_M32)
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & np.uint64(_M32)
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & np.uint64(_M32)
    x ^= x >> np.uint64(16)
    return x


def sr_key(seed: int, step, tensors) -> np.ndarray:
    """uint32 keys of step ``step`` (a number, or one per tensor) for the tensors numbered
    ``tensors`` (an optimizer numbers its params in order over all groups) of a run seeded
    with ``seed``."""
    step = np.asarray(step, dtype=np.uint64)
    k = mix32(np.uint64((seed & _M32) ^ 0x9E3779B9))
    k = mix32(k ^ np.uint64((seed >> 32) & _M32))
    for word in (step & np.uint64(_M32), step >> np.uint64(32)):
        k = mix32(k ^ word)
    t = np.asarray(tensors, dtype=np.uint64)
    return mix32(k ^ mix32(t)).astype(np.uint32)


def element_bits(key, index):
    """uint32 random bits of elements ``index`` (int64 array) under ``key``."""
    i = np.asarray(index, dtype=np.uint64)
    hi = mix32(i >> np.uint64(32))
    return mix32((i & np.uint64(_M32)) ^ np.uint64(int(key)) ^ hi).astype(np.uint32)


# ----------------------------------------------------------------------------- rounding

def round_nearest(x: np.ndarray, storage: str) -> np.ndarray:
    """float32/64 ``x`` rounded to nearest (ties to even) into ``storage``: NumPy's and
    ml_dtypes' own conversions, which the kernels' bit operations reproduce."""
    with np.errstate(all="ignore"):
        return x.astype(np_dtype(storage))


def round_stochastic(x: np.ndarray, storage: str, bits: np.ndarray) -> np.ndarray:
    """float32 ``x`` rounded into 16-bit ``storage`` stochastically with the uint32 random
    ``bits`` (one per element): up to the larger-magnitude neighbour when the low bits
    ``bits`` keeps are below the dropped fraction, so with probability proportional to
    closeness. NaN stays NaN; a finite value becomes infinite only where round-to-nearest
    gives infinity too (else it takes the largest finite neighbour)."""
    x = np.asarray(x, np.float32)
    b = x.view(np.uint32).astype(np.uint64)
    sign = b & np.uint64(0x80000000)
    a = b ^ sign
    if storage == "bfloat16":
        drop = np.full(a.shape, 16, np.uint64)
    else:               # float16: 13 bits dropped for normals, more below 2**-14
        e = (a >> np.uint64(23)).astype(np.int64)
        drop = np.clip(13 + 113 - e, 13, 24).astype(np.uint64)
        drop = np.where(e >= 113, np.uint64(13), drop)
    mask = (np.uint64(1) << drop) - np.uint64(1)
    up = (a + (bits.astype(np.uint64) & mask)) & ~mask
    y = (up | sign).astype(np.uint32).view(np.float32)
    if storage == "float16":     # below 2**-24 the neighbours are 0 and 2**-24
        tiny = (a >> np.uint64(23)).astype(np.int64) < 103
        frac = np.abs(x) * np.float32(2.0 ** 24)            # exact: a power-of-two scaling
        u = (bits & np.uint32(0xFFFFFF)).astype(np.float32) * np.float32(2.0 ** -24)
        t = np.where(u < frac, np.float32(2.0 ** -24), np.float32(0.0))
        t = np.copysign(t, x)
        y = np.where(tiny, t, y)
    out = round_nearest(y, storage)                 # exact: y is representable
    near = round_nearest(x, storage)
    with np.errstate(all="ignore"):
        wild = np.isinf(out.astype(np.float32)) & ~np.isinf(near.astype(np.float32))
    out = np.where(~np.isfinite(x) | wild, near, out)
    return out.astype(np_dtype(storage))


# ----------------------------------------------------------------------------- int8 state
#
# Block-wise dynamic quantization (Dettmers et al., 8-bit Optimizers via Block-wise
# Quantization): a state array is cut into blocks of BLOCK elements; each block keeps one
# float32 absmax A (the largest finite |x|) and one byte per element, the code of x / A in a
# dynamic map. The maps here are 8-bit floating-point numbers, so a code comes from the
# float's exponent and mantissa (no search) and is decoded by building a float:
#
# * signed map (a block holding a negative value: exp_avg): sign, 4 exponent bits e,
#   3 mantissa bits m: (-1)^s 2^(e-15) (1 + m/8) for e >= 1, (-1)^s 2^-17 m for e = 0;
# * unsigned map (a block of non-negative values: exp_avg_sq): 5 exponent bits, 3 mantissa
#   bits: 2^(e-31) (1 + m/8) for e >= 1, 2^-33 m for e = 0 (a dynamic range of 2^33, so
#   a small second moment is not flushed to zero next to a large one).
#
# The map is chosen per block, recorded in the sign bit of the stored absmax (negative: the
# unsigned map). Rounding is to nearest (ties to even). Error bound, for a finite x in a
# block with absmax A: |x^ - x| <= 2^-4 |x| (3 mantissa bits), or, below the maps' normal
# range, <= 2^-18 A (signed) / 2^-34 A (unsigned). Codes above 1.0 never occur for finite
# values; two of them hold NaN and infinity (which stay in their element: A is taken over
# the finite values).

_BIAS = {False: 15, True: 31}           # signed, unsigned
_NAN = {False: 0x7F, True: 0xFF}
_INF = {False: 0x7E, True: 0xFE}


def _pow2(e):
    """float32 2**e for integer arrays e (normal range)."""
    return ((np.asarray(e, np.int64) + 127) << 23).astype(np.uint32).view(np.float32)


def encode(y: np.ndarray, unsigned) -> np.ndarray:
    """uint8 codes of float32 ``y`` (|y| <= 1, or NaN/±Inf) in the signed map, or where
    ``unsigned`` the unsigned one."""
    y = np.asarray(y, np.float32)
    unsigned = np.broadcast_to(np.asarray(unsigned, bool), y.shape)
    bias = np.where(unsigned, 31, 15)
    a = np.abs(y)
    E = ((a.view(np.uint32) >> np.uint32(23)).astype(np.int64)) - 127
    e = np.maximum(E + bias, 1)
    with np.errstate(all="ignore"):
        k = np.rint(a * _pow2(bias + 3 - e)).astype(np.int64)
        k = np.where(np.isfinite(a), k, 0)
    mag = (e - 1) * 8 + k
    mag = np.where(np.isnan(y), np.where(unsigned, 0xFF, 0x7F), mag)
    mag = np.where(np.isinf(y), np.where(unsigned, 0xFE, 0x7E), mag)
    sign = np.where(~unsigned & np.signbit(y) & ~np.isnan(y), 0x80, 0)
    return (mag | sign).astype(np.uint8)


def decode(codes: np.ndarray, unsigned) -> np.ndarray:
    """float32 values (relative to the absmax) of uint8 ``codes``."""
    c = np.asarray(codes, np.int64)
    unsigned = np.broadcast_to(np.asarray(unsigned, bool), c.shape)
    mag = np.where(unsigned, c, c & 0x7F)
    e, m = mag >> 3, mag & 7
    bias = np.where(unsigned, 31, 15)
    k = np.where(e == 0, m, 8 + m).astype(np.float32)
    v = k * _pow2(np.maximum(e, 1) - bias - 3)
    v = np.where(~unsigned & (c >= 0x80), -v, v)
    v = np.where(mag == np.where(unsigned, 0xFF, 0x7F), np.float32(np.nan), v)
    inf = np.where(~unsigned & (c >= 0x80), np.float32(-np.inf), np.float32(np.inf))
    return np.where(mag == np.where(unsigned, 0xFE, 0x7E), inf, v).astype(np.float32)


def quantize(x: np.ndarray) -> tuple:
    """(uint8 codes, float32 absmax per block: negative where the block uses the unsigned
    map) of float32 ``x`` (1-D)."""
    x = np.asarray(x, np.float32).reshape(-1)
    n = x.size
    nb = -(-n // BLOCK)
    pad = np.zeros(nb * BLOCK, np.float32)
    pad[:n] = x
    blocks = pad.reshape(nb, BLOCK)
    finite = np.isfinite(blocks)
    A = np.max(np.where(finite, np.abs(blocks), 0), axis=1).astype(np.float32)
    unsigned = ~np.any(blocks < 0, axis=1)             # (-inf counts as negative)
    # y = (x * pre) * inv, inv = 1 / (A * pre): pre = 2**64 where A < 2**-120 (else 1/A
    # overflows), an exact scaling
    pre = np.where(A < np.float32(2.0 ** -120), np.float32(2.0 ** 64), np.float32(1.0))
    with np.errstate(all="ignore"):
        inv = np.where(A > 0, np.float32(1) / (A * pre), np.float32(0)).astype(np.float32)
        y = np.where(finite, (blocks * pre[:, None]) * inv[:, None], blocks)
    codes = encode(y, unsigned[:, None]).reshape(-1)[:n]
    absmax = np.where(unsigned, -A, A).astype(np.float32)
    return codes, absmax


def dequantize(codes: np.ndarray, absmax: np.ndarray) -> np.ndarray:
    """float32 values of ``codes`` with per-block ``absmax`` (as :func:`quantize` gives)."""
    codes = np.asarray(codes).reshape(-1)
    blk = np.arange(codes.size) // BLOCK
    a = np.asarray(absmax, np.float32)[blk]
    v = decode(codes, np.signbit(a))
    with np.errstate(all="ignore"):
        out = v * np.abs(a)
    return np.where(np.isfinite(v), out, v).astype(np.float32)
