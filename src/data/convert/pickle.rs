//! A minimal, non-executing Python pickle reader, enough for the CIFAR "python version" batches.
//!
//! Those files are dicts of bytes/str keys holding lists of ints, strings, and numpy arrays. A numpy array
//! is pickled as a call to `numpy.core.multiarray._reconstruct` followed by a BUILD with its state
//! `(version, shape, dtype, fortran_order, raw_bytes)` (the original CIFAR files, protocol 2 from
//! Python 2, with the raw bytes as a `str`), or, from Python 3, with the bytes wrapped in
//! `_codecs.encode(text, 'latin1')` (protocol 2) or as BINBYTES (protocol 3+), or as
//! `numpy.core.numeric._frombuffer(buffer, dtype, shape, order)` (protocol 5). This module recognises
//! exactly these constructors and builds plain values; any other global becomes an opaque value, so a
//! malicious pickle cannot run code here — at worst it is rejected.

use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;

/// A decoded Python value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Array(NdArray),
    Dtype(Dtype),
    /// A reference to a global we do not interpret (`module.name`).
    Global(String),
    /// The result of calling or building something we do not interpret.
    Opaque(String),
}

/// A numpy dtype: kind+size like "u1", "i8", and byte order ('<', '>', '|', '=').
#[derive(Clone, Debug, PartialEq)]
pub struct Dtype {
    pub descr: String,
    pub byteorder: char,
}

/// A numpy array with its raw bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct NdArray {
    pub shape: Vec<usize>,
    pub dtype: Dtype,
    pub fortran: bool,
    pub data: Vec<u8>,
}

impl NdArray {
    /// Elements as i64, for integer dtypes of 1, 2, 4 or 8 bytes.
    pub fn to_i64(&self) -> Result<Vec<i64>> {
        let d = &self.dtype.descr;
        let (kind, size) = d.split_at(1);
        let size: usize = size
            .parse()
            .map_err(|_| anyhow!("unsupported numpy dtype '{d}'"))?;
        if !(kind == "u" || kind == "i") || ![1, 2, 4, 8].contains(&size) {
            bail!("expected an integer numpy array, found dtype '{d}'");
        }
        if !self.data.len().is_multiple_of(size) {
            bail!(
                "numpy array data length {} is not a multiple of {size}",
                self.data.len()
            );
        }
        let big = self.dtype.byteorder == '>';
        Ok(self
            .data
            .chunks_exact(size)
            .map(|c| {
                let mut b = [0u8; 8];
                if big {
                    for (i, &x) in c.iter().rev().enumerate() {
                        b[i] = x;
                    }
                } else {
                    b[..size].copy_from_slice(c);
                }
                let u = u64::from_le_bytes(b);
                if kind == "i" && size < 8 {
                    let shift = 64 - 8 * size as u32;
                    ((u << shift) as i64) >> shift
                } else {
                    u as i64
                }
            })
            .collect())
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

impl Value {
    /// Looks up `key` in a dict whose keys are bytes (Python 2 pickles read as bytes) or str.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items.iter().find_map(|(k, v)| match k {
                Value::Bytes(b) if b == key.as_bytes() => Some(v),
                Value::Str(s) if s == key => Some(v),
                _ => None,
            }),
            _ => None,
        }
    }

    /// A str or bytes value as text (bytes decoded as UTF-8, lossily).
    pub fn as_text(&self) -> Option<String> {
        match self {
            Value::Str(s) => Some(s.clone()),
            Value::Bytes(b) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }

    /// A list/tuple of ints, or an integer numpy array, as i64.
    pub fn as_ints(&self) -> Result<Vec<i64>> {
        match self {
            Value::List(xs) | Value::Tuple(xs) => xs
                .iter()
                .map(|x| match x {
                    Value::Int(i) => Ok(*i),
                    Value::Bool(b) => Ok(*b as i64),
                    other => Err(anyhow!("expected an int, found {}", other.kind())),
                })
                .collect(),
            Value::Array(a) => a.to_i64(),
            other => bail!(
                "expected a list of ints or an integer array, found {}",
                other.kind()
            ),
        }
    }

    pub fn kind(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "bool".into(),
            Value::Int(_) => "int".into(),
            Value::Float(_) => "float".into(),
            Value::Str(_) => "str".into(),
            Value::Bytes(_) => "bytes".into(),
            Value::Tuple(_) => "tuple".into(),
            Value::List(_) => "list".into(),
            Value::Dict(_) => "dict".into(),
            Value::Array(a) => format!("numpy array {:?} of {}", a.shape, a.dtype.descr),
            Value::Dtype(_) => "numpy dtype".into(),
            Value::Global(g) => format!("global {g}"),
            Value::Opaque(o) => format!("object {o}"),
        }
    }
}

/// Objects live in an arena so that memoised containers mutated later (APPENDS after PUT) stay shared.
enum Obj {
    Val(Value),
    List(Vec<usize>),
    Dict(Vec<(usize, usize)>),
    Tuple(Vec<usize>),
    /// An ndarray between `_reconstruct` and its BUILD.
    PendingArray,
    /// A dtype between `numpy.dtype(descr, ...)` and its BUILD (which carries the byte order).
    PendingDtype(String),
}

enum Slot {
    Obj(usize),
    Mark,
}

struct Vm<'a> {
    b: &'a [u8],
    pos: usize,
    arena: Vec<Obj>,
    stack: Vec<Slot>,
    memo: HashMap<u64, usize>,
}

const NUMPY_MULTIARRAY: [&str; 2] = ["numpy.core.multiarray", "numpy._core.multiarray"];
const NUMPY_NUMERIC: [&str; 2] = ["numpy.core.numeric", "numpy._core.numeric"];

impl<'a> Vm<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len());
        let end = end.ok_or_else(|| {
            anyhow!(
                "pickle truncated at byte {} (needs {n} more bytes)",
                self.pos
            )
        })?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.b[self.pos..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or_else(|| anyhow!("pickle truncated in a text field"))?;
        let s = std::str::from_utf8(&rest[..n]).context("non-UTF-8 text field in pickle")?;
        self.pos += n + 1;
        Ok(s)
    }

    fn new_obj(&mut self, o: Obj) -> usize {
        self.arena.push(o);
        self.arena.len() - 1
    }
    fn push(&mut self, v: Value) {
        let id = self.new_obj(Obj::Val(v));
        self.stack.push(Slot::Obj(id));
    }
    fn push_obj(&mut self, o: Obj) {
        let id = self.new_obj(o);
        self.stack.push(Slot::Obj(id));
    }
    fn pop(&mut self) -> Result<usize> {
        match self.stack.pop() {
            Some(Slot::Obj(id)) => Ok(id),
            Some(Slot::Mark) => bail!("malformed pickle: unexpected MARK on the stack"),
            None => bail!("malformed pickle: stack underflow"),
        }
    }
    fn top(&self) -> Result<usize> {
        match self.stack.last() {
            Some(Slot::Obj(id)) => Ok(*id),
            _ => bail!("malformed pickle: expected an object on the stack"),
        }
    }
    fn pop_mark(&mut self) -> Result<Vec<usize>> {
        let at = self
            .stack
            .iter()
            .rposition(|s| matches!(s, Slot::Mark))
            .ok_or_else(|| anyhow!("malformed pickle: no MARK"))?;
        let items = self
            .stack
            .drain(at..)
            .skip(1)
            .map(|s| match s {
                Slot::Obj(id) => id,
                Slot::Mark => unreachable!(),
            })
            .collect();
        Ok(items)
    }

    /// Materialises object `id` as a `Value` (copies; only done at the end and for call arguments).
    fn value(&self, id: usize) -> Value {
        match &self.arena[id] {
            Obj::Val(v) => v.clone(),
            Obj::List(xs) => Value::List(xs.iter().map(|&x| self.value(x)).collect()),
            Obj::Tuple(xs) => Value::Tuple(xs.iter().map(|&x| self.value(x)).collect()),
            Obj::Dict(kv) => Value::Dict(
                kv.iter()
                    .map(|&(k, v)| (self.value(k), self.value(v)))
                    .collect(),
            ),
            Obj::PendingArray => Value::Opaque("numpy.ndarray without state".into()),
            Obj::PendingDtype(d) => Value::Dtype(Dtype {
                descr: d.clone(),
                byteorder: '=',
            }),
        }
    }

    fn global(&mut self, module: &str, name: &str) {
        self.push(Value::Global(format!("{module}.{name}")));
    }

    /// REDUCE: calls the handful of constructors CIFAR pickles use; anything else is opaque.
    fn reduce(&mut self, func: usize, args: usize) -> Result<Obj> {
        let f = match &self.arena[func] {
            Obj::Val(Value::Global(g)) => g.clone(),
            _ => return Ok(Obj::Val(Value::Opaque("call result".into()))),
        };
        let args = match self.value(args) {
            Value::Tuple(a) => a,
            other => bail!(
                "pickle REDUCE arguments must be a tuple, found {}",
                other.kind()
            ),
        };
        let (module, name) = f.rsplit_once('.').unwrap_or(("", &f));
        Ok(match (module, name) {
            (m, "_reconstruct") if NUMPY_MULTIARRAY.contains(&m) => Obj::PendingArray,
            ("numpy", "dtype") => match args.first() {
                Some(v) => Obj::PendingDtype(
                    v.as_text()
                        .ok_or_else(|| anyhow!("numpy dtype descriptor is not text"))?,
                ),
                None => bail!("numpy.dtype called without a descriptor"),
            },
            ("_codecs", "encode") => match (args.first(), args.get(1).and_then(|e| e.as_text())) {
                (Some(Value::Str(s)), Some(enc)) if enc == "latin1" || enc == "latin-1" => {
                    let bytes = s
                        .chars()
                        .map(|c| {
                            u8::try_from(c as u32)
                                .map_err(|_| anyhow!("non-latin1 char in _codecs.encode"))
                        })
                        .collect::<Result<Vec<u8>>>()?;
                    Obj::Val(Value::Bytes(bytes))
                }
                (Some(Value::Str(s)), Some(enc)) if enc == "utf-8" || enc == "utf8" => {
                    Obj::Val(Value::Bytes(s.clone().into_bytes()))
                }
                _ => bail!("unsupported _codecs.encode call in pickle"),
            },
            ("builtins" | "__builtin__", "bytearray") | ("builtins" | "__builtin__", "bytes") => {
                match args.first() {
                    None => Obj::Val(Value::Bytes(Vec::new())),
                    Some(Value::Bytes(b)) => Obj::Val(Value::Bytes(b.clone())),
                    Some(Value::List(xs)) => Obj::Val(Value::Bytes(
                        xs.iter()
                            .map(|x| match x {
                                Value::Int(i) => u8::try_from(*i)
                                    .map_err(|_| anyhow!("byte value {i} out of range")),
                                _ => Err(anyhow!("bytearray of non-ints")),
                            })
                            .collect::<Result<_>>()?,
                    )),
                    Some(other) => bail!("unsupported bytearray argument {}", other.kind()),
                }
            }
            (m, "_frombuffer") if NUMPY_NUMERIC.contains(&m) => {
                let [buf, dtype, shape, order] = args.as_slice() else {
                    bail!("numpy _frombuffer expects 4 arguments");
                };
                let Value::Bytes(data) = buf else {
                    bail!("numpy _frombuffer without in-band bytes")
                };
                let Value::Dtype(dtype) = dtype else {
                    bail!("numpy _frombuffer without a dtype")
                };
                let shape = shape_of(shape)?;
                let fortran = order.as_text().as_deref() == Some("F");
                Obj::Val(Value::Array(NdArray {
                    shape,
                    dtype: dtype.clone(),
                    fortran,
                    data: data.clone(),
                }))
            }
            _ => Obj::Val(Value::Opaque(format!("{f}(...)"))),
        })
    }

    /// BUILD: completes a pending ndarray or dtype from its state; ignored for anything else.
    fn build(&mut self, obj: usize, state: usize) -> Result<()> {
        let st = self.value(state);
        match &self.arena[obj] {
            Obj::PendingArray => {
                let Value::Tuple(t) = st else {
                    bail!("numpy array state is not a tuple")
                };
                // (version, shape, dtype, is_fortran, raw); version 1 pickles lack the version field.
                let t = if t.len() == 5 { &t[1..] } else { &t[..] };
                let [shape, dtype, fortran, raw] = t else {
                    bail!("numpy array state has {} fields", t.len())
                };
                let shape = shape_of(shape)?;
                let Value::Dtype(dtype) = dtype else {
                    bail!("numpy array state without a dtype")
                };
                let fortran = matches!(fortran, Value::Bool(true) | Value::Int(1));
                let data = match raw {
                    Value::Bytes(b) => b.clone(),
                    Value::Str(s) => s.chars().map(|c| c as u32 as u8).collect(),
                    other => bail!(
                        "numpy array data is {}, not raw bytes (object arrays are not supported)",
                        other.kind()
                    ),
                };
                self.arena[obj] = Obj::Val(Value::Array(NdArray {
                    shape,
                    dtype: dtype.clone(),
                    fortran,
                    data,
                }));
            }
            Obj::PendingDtype(descr) => {
                let byteorder = match &st {
                    Value::Tuple(t) => t
                        .get(1)
                        .and_then(|v| v.as_text())
                        .and_then(|s| s.chars().next())
                        .unwrap_or('='),
                    _ => '=',
                };
                self.arena[obj] = Obj::Val(Value::Dtype(Dtype {
                    descr: descr.clone(),
                    byteorder,
                }));
            }
            _ => {}
        }
        Ok(())
    }

    fn run(&mut self) -> Result<usize> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        bail!("pickle protocol {proto} is newer than this reader (≤ 5)");
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: framing is transparent to the reader
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Slot::Mark),
                b'0' => {
                    self.stack.pop().ok_or_else(|| anyhow!("POP on empty stack"))?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let t = self.top()?;
                    self.stack.push(Slot::Obj(t));
                }
                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'J' => {
                    let v = self.u32()? as i32 as i64;
                    self.push(Value::Int(v))
                }
                b'K' => {
                    let v = self.u8()? as i64;
                    self.push(Value::Int(v))
                }
                b'M' => {
                    let v = self.u16()? as i64;
                    self.push(Value::Int(v))
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a { self.u8()? as usize } else { self.u32()? as usize };
                    let bytes = self.take(n)?;
                    if n > 8 {
                        bail!("integer of {n} bytes in pickle is too large");
                    }
                    let mut b = [0u8; 8];
                    b[..n].copy_from_slice(bytes);
                    let mut v = i64::from_le_bytes(b);
                    if n > 0 && n < 8 && bytes[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.push(Value::Int(v))
                }
                b'I' | b'L' => {
                    let s = self.line()?.trim_end_matches('L');
                    let v = match s {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        _ => Value::Int(s.parse().with_context(|| format!("bad integer '{s}' in pickle"))?),
                    };
                    self.push(v)
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.push(Value::Float(v))
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => self.u32()? as usize,
                        0x8c => self.u8()? as usize,
                        _ => self.u64()? as usize,
                    };
                    let s = std::str::from_utf8(self.take(n)?).context("invalid UTF-8 string in pickle")?;
                    self.push(Value::Str(s.to_string()))
                }
                // Python 2 str (BINSTRING, SHORT_BINSTRING) reads as bytes, like pickle.load(encoding='bytes').
                b'T' | b'U' | b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'T' | b'B' => self.u32()? as usize,
                        b'U' | b'C' => self.u8()? as usize,
                        _ => self.u64()? as usize,
                    };
                    let bytes = self.take(n)?.to_vec();
                    self.push(Value::Bytes(bytes))
                }
                b')' => self.push_obj(Obj::Tuple(vec![])),
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        bail!("malformed pickle: TUPLE{n} on a short stack");
                    }
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push_obj(Obj::Tuple(items))
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push_obj(Obj::Tuple(items))
                }
                b']' => self.push_obj(Obj::List(vec![])),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push_obj(Obj::List(items))
                }
                b'}' => self.push_obj(Obj::Dict(vec![])),
                b'd' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        bail!("malformed pickle: DICT with an odd number of items");
                    }
                    let kv = items.chunks(2).map(|p| (p[0], p[1])).collect();
                    self.push_obj(Obj::Dict(kv))
                }
                b'a' => {
                    let v = self.pop()?;
                    let l = self.top()?;
                    match &mut self.arena[l] {
                        Obj::List(xs) => xs.push(v),
                        _ => bail!("malformed pickle: APPEND to a non-list"),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let l = self.top()?;
                    match &mut self.arena[l] {
                        Obj::List(xs) => xs.extend(items),
                        _ => bail!("malformed pickle: APPENDS to a non-list"),
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let d = self.top()?;
                    match &mut self.arena[d] {
                        Obj::Dict(kv) => kv.push((k, v)),
                        _ => bail!("malformed pickle: SETITEM on a non-dict"),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        bail!("malformed pickle: SETITEMS with an odd number of items");
                    }
                    let d = self.top()?;
                    match &mut self.arena[d] {
                        Obj::Dict(kv) => kv.extend(items.chunks(2).map(|p| (p[0], p[1]))),
                        _ => bail!("malformed pickle: SETITEMS on a non-dict"),
                    }
                }
                b'c' => {
                    let module = self.line()?.to_string();
                    let name = self.line()?.to_string();
                    self.global(&module, &name)
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Some(m), Some(n)) = (self.value(module).as_text(), self.value(name).as_text()) else {
                        bail!("malformed pickle: STACK_GLOBAL needs two strings");
                    };
                    self.global(&m, &n)
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let o = self.reduce(func, args)?;
                    self.push_obj(o)
                }
                0x81 => {
                    // NEWOBJ cls args: we never instantiate classes.
                    let _args = self.pop()?;
                    let cls = self.pop()?;
                    let name = match &self.arena[cls] {
                        Obj::Val(Value::Global(g)) => g.clone(),
                        _ => "?".into(),
                    };
                    self.push(Value::Opaque(name))
                }
                b'b' => {
                    let state = self.pop()?;
                    let obj = self.top()?;
                    self.build(obj, state)?
                }
                b'q' => {
                    let k = self.u8()? as u64;
                    let t = self.top()?;
                    self.memo.insert(k, t);
                }
                b'r' => {
                    let k = self.u32()? as u64;
                    let t = self.top()?;
                    self.memo.insert(k, t);
                }
                0x94 => {
                    let k = self.memo.len() as u64;
                    let t = self.top()?;
                    self.memo.insert(k, t);
                }
                b'p' => {
                    let k: u64 = self.line()?.parse().context("bad PUT index")?;
                    let t = self.top()?;
                    self.memo.insert(k, t);
                }
                b'h' | b'j' | b'g' => {
                    let k = match op {
                        b'h' => self.u8()? as u64,
                        b'j' => self.u32()? as u64,
                        _ => self.line()?.parse().context("bad GET index")?,
                    };
                    let id = *self.memo.get(&k).ok_or_else(|| anyhow!("malformed pickle: memo key {k} unknown"))?;
                    self.stack.push(Slot::Obj(id));
                }
                0x8f => self.push(Value::Opaque("set".into())),
                0x90 => {
                    self.pop_mark()?;
                }
                0x91 => {
                    self.pop_mark()?;
                    self.push(Value::Opaque("frozenset".into()))
                }
                _ => bail!(
                    "unsupported pickle opcode 0x{op:02x} ('{}') at byte {at}; this reader handles the CIFAR batches \
                     (binary protocols 2–5)",
                    (op as char).escape_default()
                ),
            }
        }
    }
}

fn shape_of(v: &Value) -> Result<Vec<usize>> {
    match v {
        Value::Tuple(xs) | Value::List(xs) => xs
            .iter()
            .map(|x| match x {
                Value::Int(i) if *i >= 0 => Ok(*i as usize),
                _ => Err(anyhow!("bad numpy shape entry {}", x.kind())),
            })
            .collect(),
        Value::Int(i) if *i >= 0 => Ok(vec![*i as usize]),
        other => bail!("bad numpy shape {}", other.kind()),
    }
}

/// Decodes one pickled object.
pub fn load(bytes: &[u8]) -> Result<Value> {
    let mut vm = Vm {
        b: bytes,
        pos: 0,
        arena: Vec::new(),
        stack: Vec::new(),
        memo: HashMap::new(),
    };
    let id = vm.run()?;
    Ok(vm.value(id))
}
