//! `Value`: the dynamic value that JSON-defined jobs compute on.
//!
//! Records carry `Value`s as key and payload. The type is small (24 bytes) and cheap to
//! clone: scalars are inline, strings, bytes, lists and maps are reference-counted and
//! immutable, so a clone never copies their contents. Integer and float values never
//! allocate, which keeps the per-record path of numeric jobs allocation-free.
//!
//! Equality, ordering and hashing are total (floats compare by IEEE total order and hash by
//! bits) so any `Value` can be a key of a hash map or a sorted window.

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// A dynamic value: null, bool, i64, f64, string, bytes, list or map.
///
/// Maps keep their entries sorted by key with unique keys (see [`Value::map`]), so field
/// lookup is a binary search and two maps with the same entries are equal.
#[derive(Clone, Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(serialize_bounds(
    __S: rkyv::ser::Writer + rkyv::ser::Allocator + rkyv::ser::Sharing,
    <__S as rkyv::rancor::Fallible>::Error: rkyv::rancor::Source,
))]
#[rkyv(deserialize_bounds(
    __D: rkyv::de::Pooling,
    <__D as rkyv::rancor::Fallible>::Error: rkyv::rancor::Source,
))]
#[rkyv(bytecheck(bounds(
    __C: rkyv::validation::ArchiveContext + rkyv::validation::SharedContext,
    <__C as rkyv::rancor::Fallible>::Error: rkyv::rancor::Source,
)))]
pub enum Value {
    /// The absence of a value (JSON `null`, a missing field).
    #[default]
    Null,
    /// A boolean.
    Bool(bool),
    /// A 64-bit signed integer.
    Int(i64),
    /// A 64-bit float.
    Float(f64),
    /// A UTF-8 string, shared.
    Str(Arc<str>),
    /// Raw bytes, shared.
    Bytes(Arc<[u8]>),
    /// A list, shared.
    List(#[rkyv(omit_bounds)] Arc<[Value]>),
    /// A map from field name to value, entries sorted by name, shared.
    Map(#[rkyv(omit_bounds)] Arc<[(Arc<str>, Value)]>),
}

/// `entries` sorted by name, one per name: the last given of each (map field semantics).
pub(crate) fn sorted_last_wins<T>(mut entries: Vec<(Arc<str>, T)>) -> Vec<(Arc<str>, T)> {
    // Stable sort keeps insertion order among equal names; keep the last of each run.
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out: Vec<(Arc<str>, T)> = Vec::with_capacity(entries.len());
    for (k, val) in entries {
        match out.last_mut() {
            Some(last) if last.0 == k => last.1 = val,
            _ => out.push((k, val)),
        }
    }
    out
}

impl Value {
    /// Builds a string value.
    pub fn str(s: &str) -> Value {
        Value::Str(Arc::from(s))
    }

    /// Builds a list value.
    pub fn list(items: Vec<Value>) -> Value {
        Value::List(Arc::from(items))
    }

    /// Builds a map value from entries in any order; a later duplicate key wins.
    pub fn map<K: Into<Arc<str>>>(entries: impl IntoIterator<Item = (K, Value)>) -> Value {
        let v = entries.into_iter().map(|(k, v)| (k.into(), v)).collect();
        Value::Map(Arc::from(sorted_last_wins(v)))
    }

    /// Whether lists and maps nest in it more than `limit` levels (a scalar has none, a
    /// list of scalars one); looks no deeper than that.
    pub fn nested_deeper_than(&self, limit: usize) -> bool {
        match self {
            Value::List(items) => {
                limit == 0 || items.iter().any(|v| v.nested_deeper_than(limit - 1))
            }
            Value::Map(entries) => {
                limit == 0 || entries.iter().any(|(_, v)| v.nested_deeper_than(limit - 1))
            }
            _ => false,
        }
    }

    /// True when `self` can go one level down, into a list or map, and the record holding it
    /// still be carried by the data plane ([`MAX_VALUE_DEPTH`](crate::codec::MAX_VALUE_DEPTH)):
    /// what operators check before they wrap a value they did not build.
    #[inline]
    pub fn fits_one_level_down(&self) -> bool {
        !self.nested_deeper_than(crate::codec::MAX_VALUE_DEPTH - 1)
    }

    /// True when `self` and `other` are the same string, bytes, list or map allocation
    /// (clones of one another): returning one as the other builds nothing.
    #[inline]
    pub fn shares_allocation(&self, other: &Value) -> bool {
        match (self, other) {
            (Value::Str(a), Value::Str(b)) => Arc::ptr_eq(a, b),
            (Value::Bytes(a), Value::Bytes(b)) => Arc::ptr_eq(a, b),
            (Value::List(a), Value::List(b)) => Arc::ptr_eq(a, b),
            (Value::Map(a), Value::Map(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// The name of this value's type, as used in error messages and by `type_of()`.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "string",
            Value::Bytes(_) => "bytes",
            Value::List(_) => "list",
            Value::Map(_) => "map",
        }
    }

    /// Looks up a map field; `None` for a missing field or a non-map value.
    pub fn get(&self, field: &str) -> Option<&Value> {
        match self {
            Value::Map(entries) => entries
                .binary_search_by(|(k, _)| k.as_ref().cmp(field))
                .ok()
                .map(|i| &entries[i].1),
            _ => None,
        }
    }

    /// True for `Null`.
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// The integer inside, if this is an `Int`.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The number inside as f64, if this is an `Int` or a `Float`.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            _ => None,
        }
    }

    /// The string inside, if this is a `Str`.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Truthiness used by `filter`: only `true` passes.
    pub fn is_true(&self) -> bool {
        matches!(self, Value::Bool(true))
    }

    /// A stable 64-bit hash, identical in every process and release (used for partitioning
    /// and key groups, so it must never depend on a per-process random seed).
    pub fn stable_hash(&self) -> u64 {
        let mut h = StableHasher::default();
        self.hash(&mut h);
        h.finish()
    }

    fn rank(&self) -> u8 {
        match self {
            Value::Null => 0,
            Value::Bool(_) => 1,
            Value::Int(_) | Value::Float(_) => 2,
            Value::Str(_) => 3,
            Value::Bytes(_) => 4,
            Value::List(_) => 5,
            Value::Map(_) => 6,
        }
    }
}

/// FNV-1a over the value's hash input, finished with a 64-bit mixer: fast, dependency-free
/// and the same everywhere.
#[derive(Default)]
struct StableHasher(u64);

impl Hasher for StableHasher {
    fn finish(&self) -> u64 {
        mix64(self.0)
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = h;
    }
    fn write_u64(&mut self, i: u64) {
        // One multiply-xor round per word instead of eight byte rounds.
        self.0 = (self.0 ^ i)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(29);
    }
    fn write_u8(&mut self, i: u8) {
        self.write_u64(u64::from(i));
    }
    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }
    fn write_i64(&mut self, i: i64) {
        self.write_u64(i as u64);
    }
}

/// SplitMix64's finalizer: a bijective 64-bit mixer with good avalanche.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl PartialEq for Value {
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        // Fast paths for the common key types; everything else follows the total order.
        match (self, other) {
            (Value::Int(a), Value::Int(b)) => a == b,
            (Value::Str(a), Value::Str(b)) => a == b,
            _ => self.cmp(other) == Ordering::Equal,
        }
    }
}

impl Eq for Value {}

impl PartialOrd for Value {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Value {
    /// Total order: by type rank (null < bool < number < string < bytes < list < map), then
    /// by contents. Ints and floats compare numerically with each other, so `1 == 1.0`.
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Value::Null, Value::Null) => Ordering::Equal,
            (Value::Bool(a), Value::Bool(b)) => a.cmp(b),
            (Value::Int(a), Value::Int(b)) => a.cmp(b),
            (Value::Float(a), Value::Float(b)) => a.total_cmp(b),
            (Value::Int(a), Value::Float(b)) => cmp_int_float(*a, *b),
            (Value::Float(a), Value::Int(b)) => cmp_int_float(*b, *a).reverse(),
            (Value::Str(a), Value::Str(b)) => a.cmp(b),
            (Value::Bytes(a), Value::Bytes(b)) => a.cmp(b),
            (Value::List(a), Value::List(b)) => a.iter().cmp(b.iter()),
            (Value::Map(a), Value::Map(b)) => a.iter().cmp(b.iter()),
            _ => self.rank().cmp(&other.rank()),
        }
    }
}

/// 2^63: the first float above every `i64`.
const TWO_POW_63: f64 = 9_223_372_036_854_775_808.0;

/// Compares an int with a float exactly, not through `i as f64`, which rounds above 2^53
/// and would make `2^53 + 1` equal to `2^53` as a float but not as an int (breaking the
/// order's transitivity and hashing). The int sits where its number does in
/// `f64::total_cmp`'s order: zero at +0.0 (above -0.0), every int between the NaNs.
fn cmp_int_float(i: i64, f: f64) -> Ordering {
    if f.is_nan() {
        return if f.is_sign_negative() {
            Ordering::Greater
        } else {
            Ordering::Less
        };
    }
    if f >= TWO_POW_63 {
        return Ordering::Less;
    }
    if f < -TWO_POW_63 {
        return Ordering::Greater;
    }
    // In range, the float's integer part is an exact i64; its fraction breaks ties.
    let whole = f.trunc();
    i.cmp(&(whole as i64)).then_with(|| {
        if f > whole {
            Ordering::Less
        } else if f < whole || (f == 0.0 && f.is_sign_negative()) {
            Ordering::Greater
        } else {
            Ordering::Equal
        }
    })
}

impl Hash for Value {
    /// Ints (the common key) hash inline; other kinds go through `hash_other`.
    #[inline(always)]
    fn hash<H: Hasher>(&self, state: &mut H) {
        match self {
            Value::Int(i) => state.write_i64(*i),
            _ => self.hash_other(state),
        }
    }
}

impl Value {
    #[inline(never)]
    fn hash_other<H: Hasher>(&self, state: &mut H) {
        match self {
            Value::Null => state.write_u8(0),
            Value::Bool(b) => state.write_u8(2 + u8::from(*b)),
            Value::Int(i) => state.write_i64(*i),
            // A float equal to an int must hash like that int (they compare equal).
            Value::Float(f) if f.fract() == 0.0 && (-TWO_POW_63..TWO_POW_63).contains(f) => {
                state.write_i64(*f as i64)
            }
            Value::Float(f) => state.write_u64(f.to_bits()),
            Value::Str(s) => {
                state.write_u8(4);
                state.write(s.as_bytes());
            }
            Value::Bytes(b) => {
                state.write_u8(5);
                state.write(b);
            }
            Value::List(items) => {
                state.write_u8(6);
                state.write_usize(items.len());
                for v in items.iter() {
                    v.hash(state);
                }
            }
            Value::Map(entries) => {
                state.write_u8(7);
                state.write_usize(entries.len());
                for (k, v) in entries.iter() {
                    state.write(k.as_bytes());
                    v.hash(state);
                }
            }
        }
    }
}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Value {
    /// Formats as compact JSON (bytes as a list of numbers).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match serde_json::to_string(self) {
            Ok(s) => f.write_str(&s),
            Err(_) => Err(fmt::Error),
        }
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Int(i)
    }
}
impl From<f64> for Value {
    fn from(x: f64) -> Self {
        Value::Float(x)
    }
}
impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}
impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::str(s)
    }
}
impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Str(Arc::from(s))
    }
}

impl From<&serde_json::Value> for Value {
    fn from(j: &serde_json::Value) -> Self {
        match j {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(*b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            serde_json::Value::String(s) => Value::str(s),
            serde_json::Value::Array(a) => Value::list(a.iter().map(Value::from).collect()),
            serde_json::Value::Object(o) => {
                Value::map(o.iter().map(|(k, v)| (k.as_str(), Value::from(v))))
            }
        }
    }
}

impl serde::Serialize for Value {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        match self {
            Value::Null => s.serialize_unit(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Int(i) => s.serialize_i64(*i),
            Value::Float(x) => s.serialize_f64(*x),
            Value::Str(x) => s.serialize_str(x),
            Value::Bytes(b) => {
                let mut seq = s.serialize_seq(Some(b.len()))?;
                for byte in b.iter() {
                    seq.serialize_element(byte)?;
                }
                seq.end()
            }
            Value::List(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for v in items.iter() {
                    seq.serialize_element(v)?;
                }
                seq.end()
            }
            Value::Map(entries) => {
                let mut m = s.serialize_map(Some(entries.len()))?;
                for (k, v) in entries.iter() {
                    m.serialize_entry(k.as_ref(), v)?;
                }
                m.end()
            }
        }
    }
}

impl<'de> serde::Deserialize<'de> for Value {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let j = serde_json::Value::deserialize(d)?;
        Ok(Value::from(&j))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_is_24_bytes() {
        assert_eq!(std::mem::size_of::<Value>(), 24);
    }

    #[test]
    fn ints_and_floats_compare_and_hash_alike() {
        assert_eq!(Value::Int(3), Value::Float(3.0));
        assert_eq!(Value::Int(3).stable_hash(), Value::Float(3.0).stable_hash());
        assert!(Value::Int(2) < Value::Float(2.5));
        assert!(Value::Null < Value::Bool(false));
        assert!(Value::Int(i64::MAX) < Value::str(""));
    }

    /// Ensures ints and floats compare exactly, whatever their size: the order stays total
    /// and transitive, and values that compare equal hash alike (hash tables and sorts rely
    /// on both). Rounding an int to a float made 2^53 + 1 equal to 2^53 as a float, while
    /// hashing differently and comparing above it as an int.
    #[test]
    fn ints_and_floats_compare_exactly() {
        const P53: i64 = 1 << 53;
        let two63 = 9_223_372_036_854_775_808.0;
        let ints = [
            0,
            1,
            -1,
            P53 - 1,
            P53,
            P53 + 1,
            -P53 - 1,
            i64::MAX,
            i64::MAX - 1,
            i64::MIN,
            i64::MIN + 1,
            9_000_000_000_000_000_000,
        ];
        let floats = [
            0.0,
            -0.0,
            0.5,
            -0.5,
            1.0,
            P53 as f64,
            P53 as f64 + 2.0,
            9.1e18,
            two63,
            -two63,
            -two63 * 2.0,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            -f64::NAN,
            f64::MIN_POSITIVE,
        ];
        let values: Vec<Value> = ints
            .iter()
            .map(|&i| Value::Int(i))
            .chain(floats.iter().map(|&f| Value::Float(f)))
            .collect();
        for a in &values {
            for b in &values {
                assert_eq!(a.cmp(b), b.cmp(a).reverse(), "{a:?} vs {b:?}");
                if a == b {
                    assert_eq!(a.stable_hash(), b.stable_hash(), "{a:?} == {b:?}");
                }
                for c in &values {
                    if a <= b && b <= c {
                        assert!(a <= c, "{a:?} <= {b:?} <= {c:?}");
                    }
                }
            }
        }
        let (int, float) = (Value::Int, Value::Float);
        assert!(int(P53 + 1) > float(P53 as f64));
        assert!(int(P53 + 1) < float(P53 as f64 + 2.0));
        assert_eq!(int(P53), float(P53 as f64));
        assert_eq!(int(i64::MIN), float(-two63));
        assert!(int(i64::MAX) < float(two63));
        assert_eq!(int(9_100_000_000_000_000_000), float(9.1e18));
        assert!(int(0) > float(-0.0) && int(0) < float(f64::MIN_POSITIVE));
        assert!(int(i64::MIN) > float(f64::NEG_INFINITY) && int(0) > float(-f64::NAN));
        assert!(int(i64::MAX) < float(f64::INFINITY) && int(0) < float(f64::NAN));
    }

    #[test]
    fn map_sorts_and_dedups_keys() {
        let m = Value::map([
            ("b", Value::Int(1)),
            ("a", Value::Int(2)),
            ("b", Value::Int(3)),
        ]);
        assert_eq!(m.get("a"), Some(&Value::Int(2)));
        assert_eq!(m.get("b"), Some(&Value::Int(3)));
        assert_eq!(m.get("c"), None);
        assert_eq!(m.to_string(), r#"{"a":2,"b":3}"#);
    }

    #[test]
    fn json_round_trip() {
        let text = r#"{"user":"u1","n":[1,2.5,null,true],"nested":{"x":"y"}}"#;
        let v: Value = serde_json::from_str(text).unwrap();
        assert_eq!(
            v.to_string(),
            r#"{"n":[1,2.5,null,true],"nested":{"x":"y"},"user":"u1"}"#
        );
        let back: Value = serde_json::from_str(&v.to_string()).unwrap();
        assert_eq!(back, v);
        assert_eq!(v.get("user").and_then(Value::as_str), Some("u1"));
    }

    #[test]
    fn stable_hash_is_fixed() {
        // Pinned: partitioning must not change between releases or processes.
        assert_eq!(Value::Int(42).stable_hash(), Value::Int(42).stable_hash());
        assert_ne!(Value::Int(42).stable_hash(), Value::Int(43).stable_hash());
        assert_ne!(Value::str("a").stable_hash(), Value::str("b").stable_hash());
    }
}
