"""NF4 frozen weights against bitsandbytes' own quantizer (its CPU path), on random weights."""
import warnings

import numpy as np
import pytest

from jaxlora.model.nf4 import (BLOCK, NF4_MAX_ERROR, block_absmax, dequantize_nf4, dynamic_map,
                               quantize_nf4)

torch = pytest.importorskip("torch")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    bnb = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(96, 128), (256, 640), (130, 192)]  # (out, in) of a torch Linear; 130*192/64 absmax: a partial 256 block


def weights(out: int, n_in: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out, n_in)).astype(np.float32) * 0.02
    w[0, :7] = 0.0  # zeros and an outlier: NF4 keeps exact zero, the outlier sets its block's absmax
    w[1, 3] = 0.5
    return w


@pytest.mark.parametrize("shape", SHAPES)
def test_codes_and_absmax_equal_bitsandbytes(shape):
    w = weights(*shape, seed=1)
    packed, state = bnb.quantize_4bit(torch.from_numpy(w), blocksize=BLOCK, quant_type="nf4",
                                      compress_statistics=False)
    ours = quantize_nf4(w.T, double_quant=False)  # our kernels are (in, out)
    assert np.array_equal(np.asarray(ours.codes).reshape(-1), packed.numpy().reshape(-1))
    assert np.array_equal(np.asarray(ours.absmax).reshape(-1), state.absmax.numpy())
    # dequantized: bit for bit in float32
    reference = bnb.dequantize_4bit(packed, state).numpy()
    assert np.array_equal(np.asarray(dequantize_nf4(ours)).T, reference)


@pytest.mark.parametrize("shape", SHAPES)
def test_double_quantization_equals_bitsandbytes(shape):
    w = weights(*shape, seed=2)
    ours = quantize_nf4(w.T, double_quant=True)
    absmax = np.asarray(quantize_nf4(w.T, double_quant=False).absmax).reshape(-1)
    offset = np.float32(absmax.mean(dtype=np.float64))
    assert np.asarray(ours.absmax_offset) == offset
    # The second level is bitsandbytes' blockwise 8-bit quantizer with exact nearest rounding. Given our map and
    # offset, bitsandbytes' CPU quantizer returns the same scales, and the same codes except where it takes the
    # second-nearest code (0.1-2% of values, nearly equidistant ones): there ours is a neighbour and nearer.
    theirs, state2 = bnb.quantize_blockwise(torch.from_numpy(absmax - offset), code=torch.from_numpy(dynamic_map()),
                                            blocksize=256)
    assert np.array_equal(np.asarray(ours.absmax_scale), state2.absmax.numpy())
    mine, theirs = np.asarray(ours.absmax).reshape(-1).astype(int), theirs.numpy().astype(int)
    differ = np.nonzero(mine != theirs)[0]
    assert len(differ) <= max(3, 0.03 * len(mine))
    normed = ((absmax - offset) / np.repeat(np.asarray(ours.absmax_scale), 256)[:len(absmax)])[differ]
    assert np.all(np.abs(mine[differ] - theirs[differ]) == 1)
    assert np.all(np.abs(dynamic_map()[mine[differ]] - normed) <= np.abs(dynamic_map()[theirs[differ]] - normed))
    # bitsandbytes' own compress_statistics=True: the 4-bit codes are identical; its map is within one float32
    # step of ours and its float32 mean within a few (summation order)
    packed, state = bnb.quantize_4bit(torch.from_numpy(w), blocksize=BLOCK, quant_type="nf4", compress_statistics=True)
    assert np.array_equal(np.asarray(ours.codes).reshape(-1), packed.numpy().reshape(-1))
    assert np.max(np.abs(np.sort(bnb.create_dynamic_map(signed=True).numpy()) - dynamic_map())) <= 6e-8
    assert abs(float(state.offset) - float(offset)) <= 4 * np.spacing(offset)  # float32 summation order
    # dequantized weights: code value x absmax, so they differ by at most the two absmax decodings' difference
    their_absmax = (bnb.dequantize_blockwise(state.absmax, state.state2).numpy() + float(state.offset))
    gap = np.abs(their_absmax.reshape(-1) - np.asarray(block_absmax(ours)).reshape(-1))
    diff = np.abs(bnb.dequantize_4bit(packed, state).numpy() - np.asarray(dequantize_nf4(ours)).T)
    assert np.all(diff.reshape(-1, BLOCK).max(-1) <= gap + 1e-7)
    assert np.median(gap) <= 1e-7  # most absmax codes agree: only the offset's last bit differs there


@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantized_error_within_the_nf4_bound(double_quant):
    out, n_in = 128, 256
    w = weights(out, n_in, seed=3)
    q = quantize_nf4(w.T, double_quant=double_quant)
    err = np.abs(np.asarray(dequantize_nf4(q)).T - w).reshape(out, n_in // BLOCK, BLOCK)
    true_absmax = np.abs(w).reshape(out, n_in // BLOCK, BLOCK).max(-1)
    used_absmax = np.asarray(block_absmax(q))
    # rounding to the nearest NF4 value, plus (double quantization) the absmax's own 8-bit error
    bound = true_absmax * NF4_MAX_ERROR + np.abs(used_absmax - true_absmax) * 1.0 + 1e-7
    assert np.all(err.max(-1) <= bound)
    if double_quant:  # 8-bit absmax: within a few % (the 0.5 outlier widens its 256-block)
        assert np.max(np.abs(used_absmax - true_absmax) / true_absmax) < 0.03
    else:
        assert np.array_equal(used_absmax, true_absmax)
    # zeros stay exactly zero (NF4 holds 0.0)
    assert np.all(np.asarray(dequantize_nf4(q)).T[0, :7] == 0.0)


def test_input_dimension_must_fill_blocks():
    with pytest.raises(ValueError, match=r"multiple of 64.*\(100, 32\)"):
        quantize_nf4(np.zeros((100, 32), np.float32))
