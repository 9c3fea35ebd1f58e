#!/usr/bin/env python3
"""Write CIFAR "python version" pickles from CIFAR binary records, without numpy.

Used by tests/data_convert.rs to test podgpu's pickle reader on files made by Python's own pickle module.
numpy is not needed (nor installed everywhere): a stand-in `numpy` module reduces arrays exactly the way
numpy does, so the byte stream has numpy's structure:
  ndarray -> numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), b'b') + BUILD
             (1, shape, dtype, is_fortran, raw_bytes)
  dtype   -> numpy.dtype('u1', False, True) + BUILD (3, '|', None, None, None, -1, -1, 0)
  protocol 5: numpy.core.numeric._frombuffer(PickleBuffer(raw), dtype, shape, 'C')

Styles:
  py2  protocol 2 with every str/bytes written as Python 2 `str` (SHORT_BINSTRING/BINSTRING), like the
       official CIFAR files written by Python 2's cPickle
  p2   protocol 2 from Python 3 (bytes become _codecs.encode(..., 'latin1'))
  p4   protocol 4 (BINBYTES, FRAME, MEMOIZE, STACK_GLOBAL)
  p5   protocol 5 (_frombuffer with an in-band BYTEARRAY8 buffer)

usage: make_cifar_pickle.py SOURCE.bin OUTDIR --kind cifar10|cifar100 --style py2|p2|p4|p5 --n N --split train|test
SOURCE.bin holds records <label><3072 pixels> (cifar10) or <coarse><fine><3072 pixels> (cifar100).
"""
import argparse
import os
import pickle
import struct
import sys
import types


class Py2Str(bytes):
    """A Python 2 `str`: pickled with the BINSTRING opcodes."""


def _install_fake_numpy():
    numpy = types.ModuleType("numpy")
    core = types.ModuleType("numpy.core")
    multiarray = types.ModuleType("numpy.core.multiarray")
    numeric = types.ModuleType("numpy.core.numeric")

    def _reconstruct(*args):
        raise RuntimeError("stand-in only")

    def _frombuffer(*args):
        raise RuntimeError("stand-in only")

    class ndarray:
        pass

    class dtype:
        def __init__(self, descr, byteorder):
            self.descr, self.byteorder = descr, byteorder

        def __reduce__(self):
            return (dtype, (self.descr, False, True), (3, self.byteorder, None, None, None, -1, -1, 0))

    for f, mod in ((_reconstruct, multiarray), (_frombuffer, numeric)):
        f.__module__ = mod.__name__
        f.__qualname__ = f.__name__
        setattr(mod, f.__name__, f)
    for cls in (ndarray, dtype):
        cls.__module__ = "numpy"
        cls.__qualname__ = cls.__name__
        setattr(numpy, cls.__name__, cls)
    numpy.core = core
    core.multiarray = multiarray
    core.numeric = numeric
    sys.modules.update({"numpy": numpy, "numpy.core": core, "numpy.core.multiarray": multiarray,
                        "numpy.core.numeric": numeric})
    return numpy, multiarray, numeric


np, multiarray, numeric = _install_fake_numpy()


class FakeArray:
    def __init__(self, shape, raw, style):
        self.shape, self.raw, self.style = tuple(shape), raw, style

    def __reduce_ex__(self, protocol):
        dt = np.dtype(Py2Str(b"u1") if self.style == "py2" else "u1", Py2Str(b"|") if self.style == "py2" else "|")
        if protocol >= 5:
            return (numeric._frombuffer, (pickle.PickleBuffer(bytearray(self.raw)), dt, self.shape, "C"))
        raw = Py2Str(self.raw) if self.style == "py2" else bytes(self.raw)
        return (multiarray._reconstruct, (np.ndarray, (0,), Py2Str(b"b") if self.style == "py2" else b"b"),
                (1, self.shape, dt, False, raw))


class Py2Pickler(pickle._Pickler):
    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2str(self, obj):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + bytes(obj))
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + bytes(obj))
        self.memoize(obj)

    dispatch[Py2Str] = save_py2str


def dump(obj, path, style):
    with open(path, "wb") as f:
        if style == "py2":
            Py2Pickler(f, protocol=2).dump(obj)
        else:
            pickle.dump(obj, f, protocol={"p2": 2, "p4": 4, "p5": 5}[style])


def key(s, style):
    return Py2Str(s.encode()) if style == "py2" else s.encode()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("source")
    ap.add_argument("outdir")
    ap.add_argument("--kind", choices=["cifar10", "cifar100"], required=True)
    ap.add_argument("--style", choices=["py2", "p2", "p4", "p5"], required=True)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--split", choices=["train", "test"], required=True)
    a = ap.parse_args()
    rec = 3072 + (2 if a.kind == "cifar100" else 1)
    with open(a.source, "rb") as f:
        data = f.read(rec * a.n)
    assert len(data) == rec * a.n, "source too short"
    records = [data[i * rec:(i + 1) * rec] for i in range(a.n)]
    pixels = b"".join(r[rec - 3072:] for r in records)
    st = a.style
    batch = {
        key("batch_label", st): key("made by make_cifar_pickle.py", st),
        key("data", st): FakeArray((a.n, 3072), pixels, st),
        key("filenames", st): [key("img_%04d.png" % i, st) for i in range(a.n)],
    }
    if a.kind == "cifar10":
        batch[key("labels", st)] = [r[0] for r in records]
        name = "data_batch_1" if a.split == "train" else "test_batch"
        meta_name = "batches.meta"
        meta = {key("label_names", st): [key(n, st) for n in ["airplane", "automobile", "bird", "cat", "deer",
                                                              "dog", "frog", "horse", "ship", "truck"]],
                key("num_cases_per_batch", st): a.n, key("num_vis", st): 3072}
    else:
        batch[key("coarse_labels", st)] = [r[0] for r in records]
        batch[key("fine_labels", st)] = [r[1] for r in records]
        name = a.split
        meta_name = "meta"
        meta = {key("fine_label_names", st): [key("fine%d" % i, st) for i in range(100)],
                key("coarse_label_names", st): [key("coarse%d" % i, st) for i in range(20)]}
    os.makedirs(a.outdir, exist_ok=True)
    dump(batch, os.path.join(a.outdir, name), st)
    dump(meta, os.path.join(a.outdir, meta_name), st)


if __name__ == "__main__":
    main()
