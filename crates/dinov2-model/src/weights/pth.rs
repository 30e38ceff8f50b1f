//! A reader for `torch.save` zip checkpoints written for untrusted input: the pickle subset `torch.save` emits,
//! run by a small machine that executes nothing (globals are names, calls are recorded, not made), with every
//! length checked against the bytes that are there and a budget on the objects a pickle may build.
//!
//! What it understands: state dicts (`dict`, `OrderedDict`) whose values are tensors (`_rebuild_tensor_v2`,
//! `_rebuild_parameter`, `_rebuild_from_type_v2`) over storages `data/<key>` of the archive, in any dtype candle
//! has (f32, f64, f16, bf16, i64, u8; int32/int16/int8 and bool storages are widened to i64/u8), with any strides
//! and storage offset. Other values (numbers, strings, optimizer state, `argparse.Namespace`, …) are parsed and
//! skipped.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::io::{format_err, io_err};
use crate::error::Result;

/// Largest `data.pkl` read (the pickle of a ViT-g training checkpoint is well under 1 MiB).
const MAX_PICKLE_BYTES: u64 = 64 << 20;
/// Most objects a pickle may build, counting copies made by memo lookups (a state dict needs ~20 per tensor).
const MAX_OBJECTS: usize = 4_000_000;
/// Deepest nesting of containers (a state dict is 2-4 deep).
const MAX_DEPTH: usize = 256;

/// A pickled value. Calls are not made: `Reduce` keeps the callable and its arguments.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer that does not fit in an i64 (`LONG1`), kept as a marker only.
    BigInt,
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(String, String),
    PersId(Box<Value>),
    Reduce(Box<Value>, Box<Value>),
    /// `BUILD` on something that is not a dict: the object and its state.
    Build(Box<Value>, Box<Value>),
}

/// Where a tensor's elements are: storage `key` of the archive, its element type and length, and the view.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TensorRef {
    pub(crate) name: String,
    key: String,
    dtype: StorageType,
    storage_numel: usize,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum StorageType {
    F32,
    F64,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl StorageType {
    fn from_class(name: &str) -> Option<Self> {
        Some(match name {
            "FloatStorage" => Self::F32,
            "DoubleStorage" => Self::F64,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "CharStorage" => Self::I8,
            "ByteStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            _ => return None,
        })
    }

    fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }
}

/// Reads the tensors of a zip `.pth` file: the entries of the top-level dict, or of its entry `key` when the top
/// level is a dict with that key (an error if it has none). Non-tensor entries are skipped; names keep the
/// pickle's order.
pub(crate) fn read(path: &Path, key: Option<&str>) -> Result<Vec<(String, Tensor)>> {
    let (mut zip, prefix, refs) = open(path, key)?;
    let file_len = std::fs::metadata(path).map_err(|e| io_err(path, e))?.len();
    // One storage in memory at a time; views of the same storage share its read. Storages in order of first use.
    let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
    let mut group_of: HashMap<&str, usize> = HashMap::new();
    for (i, r) in refs.iter().enumerate() {
        let g = *group_of.entry(&r.key).or_insert_with(|| {
            groups.push((&r.key, Vec::new()));
            groups.len() - 1
        });
        groups[g].1.push(i);
    }
    let mut out: Vec<Option<Tensor>> = vec![None; refs.len()];
    for (key, users) in groups {
        let first = &refs[users[0]];
        let es = first.dtype.size();
        let want = first
            .storage_numel
            .checked_mul(es)
            .ok_or_else(|| format_err(path, format!("storage `{key}` is too large")))?;
        let entry = format!("{prefix}data/{key}");
        let mut f = zip.by_name(&entry).map_err(|e| {
            format_err(
                path,
                format!("tensor `{}`: storage `{entry}`: {e}", first.name),
            )
        })?;
        // The common case, one tensor covering its whole storage: read straight into the tensor's buffer (no
        // copy), once the entry and the file are known to be long enough for it.
        if let [only] = users.as_slice() {
            let r = &refs[*only];
            if r.is_whole_storage() && f.size() >= want as u64 && file_len >= want as u64 {
                let t = read_whole(&mut f, r).map_err(|e| {
                    format_err(path, format!("storage `{entry}`: {e} (truncated?)"))
                })?;
                out[*only] = Some(t);
                continue;
            }
        }
        // Reserve what the storage needs, bounded by what the entry and the file can hold (both are checked by
        // the read below; a lying header costs at most the file's size).
        let mut bytes = Vec::with_capacity(want.min(f.size() as usize).min(file_len as usize));
        (&mut f)
            .take(want as u64)
            .read_to_end(&mut bytes)
            .map_err(|e| format_err(path, format!("storage `{entry}`: {e}")))?;
        if bytes.len() != want {
            return Err(format_err(
                path,
                format!(
                    "storage `{entry}` holds {} bytes, its {} elements need {want} (truncated?)",
                    bytes.len(),
                    first.storage_numel
                ),
            ));
        }
        for i in users {
            let r = &refs[i];
            if r.dtype != first.dtype || r.storage_numel != first.storage_numel {
                return Err(format_err(
                    path,
                    format!(
                        "tensors `{}` and `{}` disagree on storage `{key}`",
                        first.name, r.name
                    ),
                ));
            }
            out[i] = Some(build_tensor(r, &bytes).map_err(|e| format_err(path, e))?);
        }
    }
    Ok(refs
        .into_iter()
        .zip(out)
        .filter_map(|(r, t)| t.map(|t| (r.name, t)))
        .collect())
}

/// The tensor names [`read`] would return, from the pickle alone (no tensor data is read).
pub(crate) fn tensor_names(path: &Path, key: Option<&str>) -> Result<Vec<String>> {
    Ok(open(path, key)?.2.into_iter().map(|r| r.name).collect())
}

type Archive = zip::ZipArchive<BufReader<File>>;

/// Opens the archive, runs its `data.pkl` and lists the tensors under `key`.
fn open(path: &Path, key: Option<&str>) -> Result<(Archive, String, Vec<TensorRef>)> {
    let file = File::open(path).map_err(|e| io_err(path, e))?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file))
        .map_err(|e| format_err(path, format!("not a readable zip archive: {e}")))?;
    // `torch.save` writes `<archive>/data.pkl`, `<archive>/data/<key>`, ...; take the shallowest data.pkl.
    let pkl = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .filter(|n| n == "data.pkl" || n.ends_with("/data.pkl"))
        .min_by_key(|n| (n.matches('/').count(), n.clone()))
        .ok_or_else(|| {
            format_err(
                path,
                "a zip archive without data.pkl: not a PyTorch checkpoint",
            )
        })?;
    let prefix = pkl.strip_suffix("data.pkl").unwrap_or("").to_string();
    if let Ok(mut f) = zip.by_name(&format!("{prefix}byteorder")) {
        let mut order = Vec::new();
        let _ = (&mut f).take(16).read_to_end(&mut order);
        if order != b"little" {
            return Err(format_err(
                path,
                format!(
                    "byte order `{}` is not supported (only little-endian checkpoints)",
                    String::from_utf8_lossy(&order)
                ),
            ));
        }
    }
    let mut bytes = Vec::new();
    {
        let mut f = zip
            .by_name(&pkl)
            .map_err(|e| format_err(path, format!("`{pkl}`: {e}")))?;
        (&mut f)
            .take(MAX_PICKLE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| format_err(path, format!("`{pkl}`: {e}")))?;
    }
    if bytes.len() as u64 > MAX_PICKLE_BYTES {
        return Err(format_err(
            path,
            format!("`{pkl}` is larger than {} MiB", MAX_PICKLE_BYTES >> 20),
        ));
    }
    let top = Machine::new(&bytes)
        .run()
        .map_err(|e| format_err(path, format!("malformed pickle `{pkl}`: {e}")))?;
    let top = match (key, top) {
        (Some(k), Value::Dict(items)) => items
            .into_iter()
            .find(|(name, _)| matches!(name, Value::Str(s) if s == k))
            .map(|(_, v)| v)
            .ok_or_else(|| format_err(path, format!("the checkpoint has no entry `{k}`")))?,
        (_, top) => top,
    };
    let mut refs = Vec::new();
    // `OrderedDict()` calls are dicts already (see `REDUCE`).
    if let Value::Dict(items) = &top {
        for (name, value) in items {
            let Value::Str(name) = name else { continue };
            if let Some(r) = tensor_ref(name, value).map_err(|e| format_err(path, e))? {
                refs.push(r);
            }
        }
    }
    Ok((zip, prefix, refs))
}

fn is_global(v: &Value, module: &str, name: &str) -> bool {
    matches!(v, Value::Global(m, n) if m == module && n == name)
}

/// Recognises a pickled tensor; `Ok(None)` for any other value.
fn tensor_ref(name: &str, value: &Value) -> std::result::Result<Option<TensorRef>, String> {
    let Value::Reduce(callable, args) = value else {
        return Ok(None);
    };
    let Value::Tuple(args) = args.as_ref() else {
        return Ok(None);
    };
    if is_global(callable, "torch._utils", "_rebuild_parameter")
        || is_global(callable, "torch._utils", "_rebuild_parameter_with_state")
    {
        return match args.first() {
            Some(inner) => tensor_ref(name, inner),
            None => Ok(None),
        };
    }
    if is_global(callable, "torch._tensor", "_rebuild_from_type_v2") {
        // (function, type, args, state): the tensor is `function(*args)`.
        return match (args.first(), args.get(2)) {
            (Some(f), Some(a)) => tensor_ref(
                name,
                &Value::Reduce(Box::new(f.clone()), Box::new(a.clone())),
            ),
            _ => Ok(None),
        };
    }
    if !is_global(callable, "torch._utils", "_rebuild_tensor_v2") {
        return Ok(None);
    }
    let bad = |what: &str| format!("tensor `{name}`: {what}");
    if args.len() < 4 {
        return Err(bad(
            "_rebuild_tensor_v2 needs (storage, offset, size, stride)",
        ));
    }
    let Value::PersId(storage) = &args[0] else {
        return Err(bad("the storage is not a persistent id"));
    };
    let Value::Tuple(storage) = storage.as_ref() else {
        return Err(bad("malformed storage id"));
    };
    // ('storage', torch.FloatStorage, key, location, numel)
    let (class, key, numel) = match storage.as_slice() {
        [Value::Str(tag), Value::Global(_, class), Value::Str(key), _, numel]
            if tag == "storage" =>
        {
            (class, key, numel)
        }
        _ => return Err(bad("malformed storage id")),
    };
    let dtype = StorageType::from_class(class)
        .ok_or_else(|| bad(&format!("unsupported storage type {class}")))?;
    if key.is_empty() || key.contains(['/', '\\']) || key.contains("..") {
        return Err(bad(&format!("invalid storage key `{key}`")));
    }
    let to_usize = |v: &Value, what: &str| match v {
        Value::Int(i) if *i >= 0 => usize::try_from(*i).map_err(|_| bad(what)),
        _ => Err(bad(&format!("{what} is not a non-negative integer"))),
    };
    let storage_numel = to_usize(numel, "the storage length")?;
    let offset = to_usize(&args[1], "the storage offset")?;
    let dims = |v: &Value, what: &str| match v {
        Value::Tuple(items) => items
            .iter()
            .map(|d| to_usize(d, what))
            .collect::<std::result::Result<Vec<_>, _>>(),
        _ => Err(bad(&format!("{what} is not a tuple"))),
    };
    let shape = dims(&args[2], "a size")?;
    let stride = dims(&args[3], "a stride")?;
    if shape.len() != stride.len() {
        return Err(bad(&format!(
            "size {shape:?} and stride {stride:?} differ in rank"
        )));
    }
    // The last element the view touches must lie inside the storage.
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad(&format!("size {shape:?} overflows")))?;
    if numel > 0 {
        let last = shape
            .iter()
            .zip(&stride)
            .try_fold(offset, |acc, (&d, &s)| {
                acc.checked_add((d - 1).checked_mul(s)?)
            })
            .ok_or_else(|| bad("the view overflows"))?;
        if last >= storage_numel {
            return Err(bad(&format!(
                "size {shape:?}, stride {stride:?} and offset {offset} reach element {last} of a storage of {storage_numel}"
            )));
        }
    }
    Ok(Some(TensorRef {
        name: name.to_string(),
        key: key.clone(),
        dtype,
        storage_numel,
        offset,
        shape,
        stride,
    }))
}

impl TensorRef {
    /// A row-major view of every element of its storage.
    fn is_whole_storage(&self) -> bool {
        let numel: usize = self.shape.iter().product();
        let mut expect = 1usize;
        let dense = self.shape.iter().zip(&self.stride).rev().all(|(&d, &s)| {
            let ok = d <= 1 || s == expect;
            expect *= d;
            ok
        });
        self.offset == 0 && numel == self.storage_numel && dense
    }
}

/// Reads a whole storage of plain-old-data elements into a tensor of `r`'s shape without an intermediate copy.
fn read_whole(f: &mut impl Read, r: &TensorRef) -> std::result::Result<Tensor, String> {
    fn pod<T: candle_core::WithDType + Default>(
        f: &mut impl Read,
        r: &TensorRef,
    ) -> std::result::Result<Tensor, String> {
        let mut v = vec![T::default(); r.storage_numel];
        // SAFETY: T is one of f32, f64, f16, bf16, i64, u8: every bit pattern is a valid value, and the byte view
        // covers exactly the vector's initialised elements.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(
                v.as_mut_ptr().cast::<u8>(),
                std::mem::size_of_val(v.as_slice()),
            )
        };
        f.read_exact(bytes).map_err(|e| e.to_string())?;
        if cfg!(target_endian = "big") {
            return Err("big-endian hosts are not supported".into());
        }
        Tensor::from_vec(v, r.shape.clone(), &Device::Cpu).map_err(|e| e.to_string())
    }
    match r.dtype {
        StorageType::F32 => pod::<f32>(f, r),
        StorageType::F64 => pod::<f64>(f, r),
        StorageType::F16 => pod::<half::f16>(f, r),
        StorageType::BF16 => pod::<half::bf16>(f, r),
        StorageType::I64 => pod::<i64>(f, r),
        StorageType::U8 | StorageType::Bool => pod::<u8>(f, r),
        // Widened types go through the byte path.
        _ => {
            let mut bytes = vec![0u8; r.storage_numel * r.dtype.size()];
            f.read_exact(&mut bytes).map_err(|e| e.to_string())?;
            build_tensor(r, &bytes)
        }
    }
}

/// Gathers a (possibly strided) view out of its storage's bytes into a contiguous candle tensor.
fn build_tensor(r: &TensorRef, storage: &[u8]) -> std::result::Result<Tensor, String> {
    let es = r.dtype.size();
    let numel: usize = r.shape.iter().product();
    let mut contiguous = Vec::with_capacity(r.shape.len());
    let mut acc = 1usize;
    for &d in r.shape.iter().rev() {
        contiguous.push(acc);
        acc *= d;
    }
    contiguous.reverse();
    let dense = r
        .shape
        .iter()
        .zip(r.stride.iter().zip(&contiguous))
        .all(|(&d, (&s, &c))| d <= 1 || s == c);
    let bytes: std::borrow::Cow<[u8]> = if dense || numel == 0 {
        let start = r.offset * es;
        storage
            .get(start..start + numel * es)
            .ok_or("view outside its storage")?
            .into()
    } else {
        // Walk the multi-index in row-major order.
        let mut out = Vec::with_capacity(numel * es);
        let mut idx = vec![0usize; r.shape.len()];
        for _ in 0..numel {
            let e = r.offset
                + idx
                    .iter()
                    .zip(&r.stride)
                    .map(|(&i, &s)| i * s)
                    .sum::<usize>();
            out.extend_from_slice(
                storage
                    .get(e * es..(e + 1) * es)
                    .ok_or("view outside its storage")?,
            );
            for k in (0..idx.len()).rev() {
                idx[k] += 1;
                if idx[k] < r.shape[k] {
                    break;
                }
                idx[k] = 0;
            }
        }
        out.into()
    };
    let err = |e: candle_core::Error| format!("tensor `{}`: {e}", r.name);
    let shape = r.shape.clone();
    let widen = |vals: Vec<i64>| Tensor::from_vec(vals, shape.clone(), &Device::Cpu);
    match r.dtype {
        StorageType::F32 => Tensor::from_raw_buffer(&bytes, DType::F32, &shape, &Device::Cpu),
        StorageType::F64 => Tensor::from_raw_buffer(&bytes, DType::F64, &shape, &Device::Cpu),
        StorageType::F16 => Tensor::from_raw_buffer(&bytes, DType::F16, &shape, &Device::Cpu),
        StorageType::BF16 => Tensor::from_raw_buffer(&bytes, DType::BF16, &shape, &Device::Cpu),
        StorageType::I64 => Tensor::from_raw_buffer(&bytes, DType::I64, &shape, &Device::Cpu),
        StorageType::U8 | StorageType::Bool => {
            Tensor::from_raw_buffer(&bytes, DType::U8, &shape, &Device::Cpu)
        }
        StorageType::I32 => widen(
            bytes
                .chunks_exact(4)
                .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
        ),
        StorageType::I16 => widen(
            bytes
                .chunks_exact(2)
                .map(|c| i64::from(i16::from_le_bytes([c[0], c[1]])))
                .collect(),
        ),
        StorageType::I8 => widen(bytes.iter().map(|&b| i64::from(b as i8)).collect()),
    }
    .map_err(err)
}

/// The pickle machine: a stack, a memo, and an object budget.
struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    /// Positions in `stack` of the open `MARK`s.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    budget: usize,
}

type PResult<T> = std::result::Result<T, String>;

impl<'a> Machine<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self {
            data,
            pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            budget: MAX_OBJECTS,
        }
    }

    fn take(&mut self, n: usize) -> PResult<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| format!("truncated at byte {} (needs {n} more bytes)", self.pos))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> PResult<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> PResult<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> PResult<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> PResult<u64> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    fn len(&mut self, n: u64) -> PResult<usize> {
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.data.len() - self.pos)
            .ok_or_else(|| format!("a length of {n} at byte {} runs past the end", self.pos))
    }
    fn line(&mut self) -> PResult<String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("unterminated line")?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| "a line that is not UTF-8")?;
        self.pos += n + 1;
        Ok(s.to_string())
    }
    fn utf8(&mut self, n: usize) -> PResult<Value> {
        let b = self.take(n)?;
        Ok(Value::Str(
            std::str::from_utf8(b)
                .map_err(|_| "a string that is not UTF-8")?
                .to_string(),
        ))
    }

    /// Charges `n` objects to the budget.
    fn charge(&mut self, n: usize) -> PResult<()> {
        self.budget = self
            .budget
            .checked_sub(n)
            .ok_or_else(|| format!("more than {MAX_OBJECTS} objects (a memo bomb?)"))?;
        Ok(())
    }

    fn push(&mut self, v: Value) -> PResult<()> {
        self.charge(1)?;
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self) -> PResult<Value> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err("pop across a mark".into());
        }
        self.stack.pop().ok_or_else(|| "stack underflow".into())
    }

    fn top(&mut self) -> PResult<&mut Value> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err("no object above the mark".into());
        }
        self.stack
            .last_mut()
            .ok_or_else(|| "stack underflow".into())
    }

    fn pop_mark(&mut self) -> PResult<Vec<Value>> {
        let m = self.marks.pop().ok_or("no mark")?;
        Ok(self.stack.split_off(m))
    }

    /// Counts the objects in `v` (bounded by the budget) so that copies are charged.
    fn charge_copy(&mut self, v: &Value, depth: usize) -> PResult<()> {
        if depth > MAX_DEPTH {
            return Err(format!("nesting deeper than {MAX_DEPTH}"));
        }
        self.charge(1)?;
        match v {
            Value::Tuple(xs) | Value::List(xs) => {
                xs.iter().try_for_each(|x| self.charge_copy(x, depth + 1))
            }
            Value::Dict(kv) => kv.iter().try_for_each(|(k, x)| {
                self.charge_copy(k, depth + 1)?;
                self.charge_copy(x, depth + 1)
            }),
            Value::PersId(a) => self.charge_copy(a, depth + 1),
            Value::Reduce(a, b) | Value::Build(a, b) => {
                self.charge_copy(a, depth + 1)?;
                self.charge_copy(b, depth + 1)
            }
            Value::Str(s) => self.charge(s.len() / 64),
            Value::Bytes(s) => self.charge(s.len() / 64),
            _ => Ok(()),
        }
    }

    fn memo_get(&mut self, i: u32) -> PResult<()> {
        let v = self
            .memo
            .get(&i)
            .ok_or_else(|| format!("memo {i} is empty"))?
            .clone();
        self.charge_copy(&v, 0)?;
        self.stack.push(v);
        Ok(())
    }

    fn memo_put(&mut self, i: u32) -> PResult<()> {
        let v = self.top()?.clone();
        self.charge_copy(&v, 0)?;
        self.memo.insert(i, v);
        Ok(())
    }

    fn set_items(&mut self, items: Vec<Value>) -> PResult<()> {
        if items.len() % 2 != 0 {
            return Err("SETITEMS with an odd number of values".into());
        }
        let Value::Dict(d) = self.top()? else {
            return Err("SETITEMS on something that is not a dict".into());
        };
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.push((k, v));
        }
        Ok(())
    }

    fn run(mut self) -> PResult<Value> {
        loop {
            if self.stack.len() > MAX_OBJECTS || self.marks.len() > MAX_DEPTH {
                return Err("stack too deep".into());
            }
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let p = self.u8()?;
                    if p > 5 {
                        return Err(format!("pickle protocol {p} is not supported"));
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: a length hint only
                }
                b'.' => {
                    let v = self.pop()?;
                    return Ok(v);
                }
                b'(' => self.marks.push(self.stack.len()),
                b'}' => self.push(Value::Dict(Vec::new()))?,
                b']' => self.push(Value::List(Vec::new()))?,
                b')' => self.push(Value::Tuple(Vec::new()))?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(items))?;
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Value::Tuple(items))?;
                }
                b'q' => {
                    let i = self.u8()?;
                    self.memo_put(u32::from(i))?;
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?;
                }
                0x94 => {
                    let i = u32::try_from(self.memo.len()).map_err(|_| "memo full")?;
                    self.memo_put(i)?;
                }
                b'h' => {
                    let i = self.u8()?;
                    self.memo_get(u32::from(i))?;
                }
                b'j' => {
                    let i = self.u32()?;
                    self.memo_get(i)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push(Value::Global(module, name))?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.push(Value::Global(m, n))?,
                        _ => return Err("STACK_GLOBAL on non-strings".into()),
                    }
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Value::Int(i64::from(v)))?;
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(i64::from(v)))?;
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Value::Int(i64::from(v)))?;
                }
                0x8a => {
                    let n = self.u8()?;
                    let b = self.take(usize::from(n))?;
                    let v = if n <= 8 {
                        let fill = if b.last().is_some_and(|&x| x & 0x80 != 0) {
                            0xff
                        } else {
                            0
                        };
                        let mut w = [fill; 8];
                        w[..b.len()].copy_from_slice(b);
                        Value::Int(i64::from_le_bytes(w))
                    } else {
                        Value::BigInt
                    };
                    self.push(v)?;
                }
                0x8b => {
                    let n = self.u32()?;
                    let n = self.len(u64::from(n))?;
                    self.take(n)?;
                    self.push(Value::BigInt)?;
                }
                b'G' => {
                    let b = self.take(8)?;
                    self.push(Value::Float(f64::from_be_bytes(
                        b.try_into().expect("8 bytes"),
                    )))?;
                }
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'N' => self.push(Value::None)?,
                b'X' => {
                    let n = self.u32()?;
                    let n = self.len(u64::from(n))?;
                    let v = self.utf8(n)?;
                    self.charge(n / 64)?;
                    self.push(v)?;
                }
                0x8c => {
                    let n = usize::from(self.u8()?);
                    let v = self.utf8(n)?;
                    self.push(v)?;
                }
                0x8d => {
                    let n = self.u64()?;
                    let n = self.len(n)?;
                    let v = self.utf8(n)?;
                    self.charge(n / 64)?;
                    self.push(v)?;
                }
                b'B' | b'C' | 0x8e => {
                    let n = match op {
                        b'B' => u64::from(self.u32()?),
                        b'C' => u64::from(self.u8()?),
                        _ => self.u64()?,
                    };
                    let n = self.len(n)?;
                    let b = self.take(n)?.to_vec();
                    self.charge(n / 64)?;
                    self.push(Value::Bytes(b))?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.push(Value::PersId(Box::new(pid)))?;
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    // OrderedDict() is the one call whose result is filled afterwards (by SETITEMS).
                    let v = if is_global(&callable, "collections", "OrderedDict")
                        && matches!(&args, Value::Tuple(a) if a.is_empty())
                    {
                        Value::Dict(Vec::new())
                    } else {
                        Value::Reduce(Box::new(callable), Box::new(args))
                    };
                    self.push(v)?;
                }
                b'b' => {
                    let state = self.pop()?;
                    let obj = self.pop()?;
                    // BUILD on a dict sets attributes (`_metadata` of a state dict): the items stay.
                    let v = match obj {
                        d @ Value::Dict(_) => d,
                        o => Value::Build(Box::new(o), Box::new(state)),
                    };
                    self.push(v)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        Value::List(l) => l.push(v),
                        _ => return Err("APPEND on something that is not a list".into()),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::List(l) => l.extend(items),
                        _ => return Err("APPENDS on something that is not a list".into()),
                    }
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.charge_copy(&v, 0)?;
                    self.stack.push(v);
                }
                other => return Err(format!("unsupported opcode 0x{other:02x} at byte {at}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bytes: &[u8]) -> PResult<Value> {
        Machine::new(bytes).run()
    }

    #[test]
    fn a_small_pickle_runs() {
        // {'a': (1, 'x'), 'b': [True, None]} in protocol 2
        let p = b"\x80\x02}q\x00(X\x01\x00\x00\x00aK\x01X\x01\x00\x00\x00x\x86X\x01\x00\x00\x00b]q\x01(\x88Neu.";
        let v = run(p).unwrap();
        assert_eq!(
            v,
            Value::Dict(vec![
                (
                    Value::Str("a".into()),
                    Value::Tuple(vec![Value::Int(1), Value::Str("x".into())])
                ),
                (
                    Value::Str("b".into()),
                    Value::List(vec![Value::Bool(true), Value::None])
                ),
            ])
        );
    }

    #[test]
    fn lengths_past_the_end_are_errors_not_allocations() {
        // BINUNICODE claiming 4 GiB, BINBYTES8 claiming 2^63, a truncated BININT.
        for p in [
            &b"\x80\x02X\xff\xff\xff\xffabc."[..],
            &b"\x80\x02\x8e\x00\x00\x00\x00\x00\x00\x00\x80abc."[..],
            &b"\x80\x02J\x01\x00"[..],
        ] {
            let e = run(p).unwrap_err();
            assert!(e.contains("past the end") || e.contains("truncated"), "{e}");
        }
    }

    #[test]
    fn a_memo_bomb_runs_out_of_budget() {
        // l = []; repeat: l = [l, l] (memoised), 64 times: 2^64 objects if copies were free.
        let mut p = b"\x80\x02]q\x00".to_vec();
        for _ in 0..64 {
            p.extend_from_slice(b"h\x00h\x00\x86q\x00");
        }
        p.push(b'.');
        let e = run(&p).unwrap_err();
        assert!(e.contains("objects") || e.contains("nesting"), "{e}");
    }

    #[test]
    fn stack_misuse_is_an_error() {
        for p in [
            &b"."[..],
            &b"(."[..],
            &b"(N0."[..],
            &b"Ns."[..],
            &b"}(Nu."[..],
            &b"Na."[..],
            &b"\xff"[..],
        ] {
            assert!(run(p).is_err(), "{p:?}");
        }
    }

    #[test]
    fn views_outside_their_storage_are_refused() {
        let storage = Value::PersId(Box::new(Value::Tuple(vec![
            Value::Str("storage".into()),
            Value::Global("torch".into(), "FloatStorage".into()),
            Value::Str("0".into()),
            Value::Str("cpu".into()),
            Value::Int(6),
        ])));
        let t = |offset: i64, size: Vec<i64>, stride: Vec<i64>| {
            Value::Reduce(
                Box::new(Value::Global(
                    "torch._utils".into(),
                    "_rebuild_tensor_v2".into(),
                )),
                Box::new(Value::Tuple(vec![
                    storage.clone(),
                    Value::Int(offset),
                    Value::Tuple(size.into_iter().map(Value::Int).collect()),
                    Value::Tuple(stride.into_iter().map(Value::Int).collect()),
                    Value::Bool(false),
                    Value::None,
                ])),
            )
        };
        assert!(tensor_ref("w", &t(0, vec![2, 3], vec![3, 1]))
            .unwrap()
            .is_some());
        assert!(tensor_ref("w", &t(1, vec![2, 3], vec![3, 1])).is_err());
        assert!(tensor_ref("w", &t(0, vec![3, 2], vec![1, 4])).is_err());
        assert!(tensor_ref("w", &t(0, vec![-1], vec![1])).is_err());
        assert!(tensor_ref("w", &t(0, vec![1 << 40, 1 << 40], vec![1, 1])).is_err());
        // A transposed view is gathered.
        let r = tensor_ref("w", &t(0, vec![3, 2], vec![1, 3]))
            .unwrap()
            .unwrap();
        let bytes: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let got = build_tensor(&r, &bytes).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(got, vec![vec![0., 3.], vec![1., 4.], vec![2., 5.]]);
    }

    /// Every committed `.pth` fixture reads as candle's pickle reader reads it: same names, dtypes, shapes, bits.
    #[test]
    fn matches_candles_reader_on_the_fixtures() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let mut files = Vec::new();
        for d in std::fs::read_dir(&root).unwrap() {
            let d = d.unwrap().path();
            if d.is_dir() {
                for f in std::fs::read_dir(&d).unwrap() {
                    let f = f.unwrap().path();
                    if f.extension().is_some_and(|e| e == "pth") {
                        files.push(f);
                    }
                }
            }
        }
        assert!(files.len() >= 4, "{files:?}");
        let mut compared = 0;
        for f in &files {
            for key in [None, Some("teacher"), Some("model")] {
                let ours = read(f, key);
                let theirs = candle_core::pickle::read_all_with_key(f, key);
                let (Ok(mut ours), Ok(mut theirs)) = (ours, theirs) else {
                    continue;
                };
                // candle's order is a hash map's.
                ours.sort_by(|a, b| a.0.cmp(&b.0));
                theirs.sort_by(|a, b| a.0.cmp(&b.0));
                compared += 1;
                assert_eq!(ours.len(), theirs.len(), "{f:?} {key:?}");
                for ((n1, t1), (n2, t2)) in ours.iter().zip(&theirs) {
                    assert_eq!(
                        (n1, t1.dtype(), t1.dims()),
                        (n2, t2.dtype(), t2.dims()),
                        "{f:?}"
                    );
                    let b = |t: &Tensor| {
                        t.flatten_all()
                            .unwrap()
                            .to_dtype(DType::F64)
                            .unwrap()
                            .to_vec1::<f64>()
                            .unwrap()
                    };
                    assert_eq!(b(t1), b(t2), "{f:?} {n1}");
                }
            }
        }
        assert!(compared >= files.len(), "{compared} reads compared");
    }
}
