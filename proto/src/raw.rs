//! `ExecuteStream` responses whose rows stay in wire form until they are
//! read: a batch is kept as the bytes it arrived in, and each value is read
//! from them on demand, text and bytes borrowed rather than copied into a
//! `String` per value. The same wire messages as `ExecuteStreamResponse`,
//! decoded differently, for clients that read large results value by value.

use prost::bytes::{Buf, BufMut, Bytes};
use prost::encoding::{self, DecodeContext, WireType};
use prost::{DecodeError, Message};

use crate::v1::value::Kind;
use crate::v1::{QueryStats, ResultMetadata, Value};

/// A row or value of a [`RawRows`] that does not decode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawDecodeError(String);

impl std::fmt::Display for RawDecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a result row does not decode: {}", self.0)
    }
}

impl std::error::Error for RawDecodeError {}

impl From<DecodeError> for RawDecodeError {
    fn from(e: DecodeError) -> Self {
        Self(e.to_string())
    }
}

fn bad(what: &str) -> RawDecodeError {
    RawDecodeError(what.to_string())
}

/// `ExecuteStreamResponse` with its row batches left undecoded.
#[derive(Clone, PartialEq, Default, Debug)]
pub struct RawExecuteStreamResponse {
    pub payload: Option<RawPayload>,
}

#[derive(Clone, PartialEq, Debug)]
pub enum RawPayload {
    Metadata(ResultMetadata),
    Batch(RawRows),
    Stats(QueryStats),
    /// A piece of an Arrow IPC stream (`RESULT_FORMAT_ARROW_IPC`).
    ArrowIpc(Vec<u8>),
}

impl Message for RawExecuteStreamResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        match &self.payload {
            Some(RawPayload::Metadata(m)) => encoding::message::encode(1, m, buf),
            Some(RawPayload::Batch(rows)) => encoding::bytes::encode(2, &rows.bytes, buf),
            Some(RawPayload::Stats(s)) => encoding::message::encode(3, s, buf),
            Some(RawPayload::ArrowIpc(piece)) => encoding::bytes::encode(4, piece, buf),
            None => {}
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            1 => {
                let mut m = match self.payload.take() {
                    Some(RawPayload::Metadata(m)) => m,
                    _ => ResultMetadata::default(),
                };
                encoding::message::merge(wire_type, &mut m, buf, ctx)?;
                self.payload = Some(RawPayload::Metadata(m));
            }
            2 => {
                let mut bytes = Bytes::new();
                encoding::bytes::merge(wire_type, &mut bytes, buf, ctx)?;
                // A message field that comes twice is merged: the rows add up.
                if let Some(RawPayload::Batch(earlier)) = self.payload.take() {
                    // Joined, an earlier batch cut short would take the next
                    // one's bytes as its own: it must decode on its own first.
                    crate::v1::RowBatch::decode(earlier.bytes.clone())?;
                    bytes = [earlier.bytes, bytes].concat().into();
                }
                self.payload = Some(RawPayload::Batch(RawRows { bytes }));
            }
            3 => {
                let mut s = match self.payload.take() {
                    Some(RawPayload::Stats(s)) => s,
                    _ => QueryStats::default(),
                };
                encoding::message::merge(wire_type, &mut s, buf, ctx)?;
                self.payload = Some(RawPayload::Stats(s));
            }
            4 => {
                let mut piece = Vec::new();
                encoding::bytes::merge(wire_type, &mut piece, buf, ctx)?;
                self.payload = Some(RawPayload::ArrowIpc(piece));
            }
            _ => encoding::skip_field(wire_type, tag, buf, ctx)?,
        }
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        match &self.payload {
            Some(RawPayload::Metadata(m)) => encoding::message::encoded_len(1, m),
            Some(RawPayload::Batch(rows)) => encoding::bytes::encoded_len(2, &rows.bytes),
            Some(RawPayload::Stats(s)) => encoding::message::encoded_len(3, s),
            Some(RawPayload::ArrowIpc(piece)) => encoding::bytes::encoded_len(4, piece),
            None => 0,
        }
    }

    fn clear(&mut self) {
        self.payload = None;
    }
}

/// A batch of rows as received: a `RowBatch` message.
#[derive(Clone, PartialEq, Default, Debug)]
pub struct RawRows {
    bytes: Bytes,
}

impl RawRows {
    /// The rows, each read when the iterator reaches it.
    #[inline]
    pub fn iter(&self) -> Rows<'_> {
        Rows { rest: &self.bytes }
    }
}

/// Reads a varint. Keys, lengths and small integers take one byte, read
/// here; prost's reader, generic over `Buf` and called out of line for
/// every field, took 13 % of a streaming client's CPU.
#[inline(always)]
fn varint(rest: &mut &[u8]) -> Result<u64, RawDecodeError> {
    match rest.split_first() {
        Some((&byte, after)) if byte < 0x80 => {
            *rest = after;
            Ok(u64::from(byte))
        }
        _ => long_varint(rest),
    }
}

/// A varint of two to ten bytes, checked as prost checks it.
fn long_varint(rest: &mut &[u8]) -> Result<u64, RawDecodeError> {
    let mut value = 0u64;
    for (i, &byte) in rest.iter().take(10).enumerate() {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            // The tenth byte holds only the 64th bit.
            if i == 9 && byte > 1 {
                break;
            }
            *rest = rest.get(i + 1..).unwrap_or_default();
            return Ok(value);
        }
    }
    Err(bad("invalid varint"))
}

/// Reads a field's key: its number and wire type.
#[inline(always)]
fn key(rest: &mut &[u8]) -> Result<(u32, WireType), RawDecodeError> {
    let key = varint(rest)?;
    let Ok(key) = u32::try_from(key) else {
        return Err(RawDecodeError(format!("invalid key value: {key}")));
    };
    let wire_type = WireType::try_from(u64::from(key & 0x07))?;
    if key >> 3 == 0 {
        return Err(bad("invalid tag value: 0"));
    }
    Ok((key >> 3, wire_type))
}

/// Splits `len` bytes off the front of `rest`.
#[inline(always)]
fn take<'a>(rest: &mut &'a [u8], len: usize) -> Result<&'a [u8], RawDecodeError> {
    if len > rest.len() {
        return Err(bad("buffer underflow"));
    }
    let (body, after) = rest.split_at(len);
    *rest = after;
    Ok(body)
}

/// Reads the next field of a message: its number, wire type and, for
/// length-delimited fields, its contents.
#[inline(always)]
fn next_field<'a>(rest: &mut &'a [u8]) -> Result<(u32, WireType, &'a [u8]), RawDecodeError> {
    let (tag, wire_type) = key(rest)?;
    let body: &[u8] = match wire_type {
        WireType::LengthDelimited => {
            let len = usize::try_from(varint(rest)?).map_err(|_| bad("length out of range"))?;
            take(rest, len)?
        }
        WireType::Varint => {
            let start = *rest;
            varint(rest)?;
            start.get(..start.len() - rest.len()).unwrap_or_default()
        }
        WireType::SixtyFourBit => take(rest, 8)?,
        WireType::ThirtyTwoBit => take(rest, 4)?,
        WireType::StartGroup | WireType::EndGroup => return Err(bad("groups are not used by weir.v1")),
    };
    Ok((tag, wire_type, body))
}

/// The rows of a [`RawRows`].
pub struct Rows<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Rows<'a> {
    type Item = Result<RowRef<'a>, RawDecodeError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        next_of_field_1(&mut self.rest, "RowBatch.rows").map(|r| r.map(|bytes| RowRef { bytes }))
    }
}

/// The next occurrence of field 1 (`rows` of a batch, `values` of a row),
/// skipping fields a newer server may add, as prost would. After an error
/// there is nothing more to read.
#[inline(always)]
fn next_of_field_1<'a>(rest: &mut &'a [u8], what: &str) -> Option<Result<&'a [u8], RawDecodeError>> {
    while !rest.is_empty() {
        match next_field(rest) {
            Ok((1, WireType::LengthDelimited, body)) => return Some(Ok(body)),
            Ok((1, _, _)) => {
                *rest = &[];
                return Some(Err(RawDecodeError(format!("{what} is not length-delimited"))));
            }
            Ok(_) => continue,
            Err(e) => {
                *rest = &[];
                return Some(Err(e));
            }
        }
    }
    None
}

/// One row, borrowed from its batch.
#[derive(Clone, Copy, Debug)]
pub struct RowRef<'a> {
    bytes: &'a [u8],
}

impl<'a> RowRef<'a> {
    /// The row's values, in column order.
    #[inline]
    pub fn values(&self) -> Values<'a> {
        Values { rest: self.bytes }
    }
}

/// The values of a [`RowRef`].
pub struct Values<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Values<'a> {
    type Item = Result<ValueRef<'a>, RawDecodeError>;

    // Inlined into the caller: a value returned through memory was copied
    // back in pieces that stalled the CPU on every value.
    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        next_of_field_1(&mut self.rest, "Row.values").map(|r| r.and_then(ValueRef::read))
    }
}

/// One value: scalars and text as they are on the wire, borrowed from the
/// batch; dates, times, timestamps, intervals and arrays decoded.
#[derive(Clone, PartialEq, Debug)]
pub enum ValueRef<'a> {
    Null,
    Bool(bool),
    Int64(i64),
    Uint64(u64),
    Double(f64),
    String(&'a str),
    Bytes(&'a [u8]),
    Decimal(&'a str),
    Uuid(&'a str),
    Json(&'a str),
    /// A date, time, timestamp, interval or array value.
    Other(Kind),
}

#[inline(always)]
fn text(body: &[u8]) -> Result<&str, RawDecodeError> {
    std::str::from_utf8(body).map_err(|_| bad("invalid UTF-8 in a string value"))
}

/// The number a varint field holds.
#[inline(always)]
fn number(mut body: &[u8]) -> Result<u64, RawDecodeError> {
    varint(&mut body)
}

impl<'a> ValueRef<'a> {
    /// Reads a `Value` message. The last kind wins, as in prost; each
    /// field is kept as its number and bytes until then, so that the value
    /// is built once (built per field, its copies stalled the CPU).
    #[inline(always)]
    fn read(message: &'a [u8]) -> Result<Self, RawDecodeError> {
        let mut rest = message;
        let mut last = None;
        let mut replaced_message = false;
        while !rest.is_empty() {
            let (tag, wire_type, body) = next_field(&mut rest)?;
            let expected = match tag {
                1..=4 => WireType::Varint,
                5 => WireType::SixtyFourBit,
                6..=15 => WireType::LengthDelimited,
                _ => continue,
            };
            if wire_type != expected {
                return Err(RawDecodeError(format!("Value field {tag} has the wrong wire type")));
            }
            // A kind that a later one replaces must still decode, as in prost.
            if let Some((tag, body)) = last.replace((tag, body)) {
                replaced_message |= Self::scalar(tag, body)?.is_none();
            }
        }
        let Some((tag, body)) = last else {
            return Ok(ValueRef::Null);
        };
        match (Self::scalar(tag, body)?, replaced_message) {
            (Some(value), false) => Ok(value),
            // Message kinds are decoded by prost, once for the whole message
            // (which checks every field), however many of them it holds.
            (scalar, _) => {
                let whole = Value::decode(message)?;
                Ok(match (scalar, whole.kind) {
                    (Some(value), _) => value,
                    (None, Some(kind)) => ValueRef::Other(kind),
                    (None, None) => ValueRef::Null,
                })
            }
        }
    }

    /// The value of field `tag`, whose bytes are `body`; `None` for the
    /// kinds that are messages (dates, times, timestamps, intervals, lists).
    #[inline(always)]
    fn scalar(tag: u32, body: &'a [u8]) -> Result<Option<Self>, RawDecodeError> {
        Ok(Some(match tag {
            1 => ValueRef::Null,
            2 => ValueRef::Bool(number(body)? != 0),
            // Two's complement, as int64 is encoded.
            3 => ValueRef::Int64(number(body)? as i64),
            4 => ValueRef::Uint64(number(body)?),
            5 => ValueRef::Double(f64::from_le_bytes(
                body.try_into().map_err(|_| bad("buffer underflow"))?,
            )),
            6 => ValueRef::String(text(body)?),
            7 => ValueRef::Bytes(body),
            8 => ValueRef::Decimal(text(body)?),
            13 => ValueRef::Uuid(text(body)?),
            14 => ValueRef::Json(text(body)?),
            _ => return Ok(None),
        }))
    }

    /// The value as a message, copying what it borrows.
    pub fn to_value(&self) -> Value {
        let kind = match self {
            ValueRef::Null => Kind::Null(true),
            ValueRef::Bool(b) => Kind::BoolValue(*b),
            ValueRef::Int64(i) => Kind::Int64Value(*i),
            ValueRef::Uint64(u) => Kind::Uint64Value(*u),
            ValueRef::Double(d) => Kind::DoubleValue(*d),
            ValueRef::String(s) => Kind::StringValue((*s).to_owned()),
            ValueRef::Bytes(b) => Kind::BytesValue(b.to_vec()),
            ValueRef::Decimal(s) => Kind::DecimalValue((*s).to_owned()),
            ValueRef::Uuid(s) => Kind::UuidValue((*s).to_owned()),
            ValueRef::Json(s) => Kind::JsonValue((*s).to_owned()),
            ValueRef::Other(kind) => kind.clone(),
        };
        Value { kind: Some(kind) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::execute_stream_response::Payload;
    use crate::v1::{Date, ExecuteStreamResponse, ListValue, Row, RowBatch};

    fn every_kind() -> Vec<Value> {
        let kinds = vec![
            Kind::Null(true),
            Kind::BoolValue(true),
            Kind::BoolValue(false),
            Kind::Int64Value(i64::MIN),
            Kind::Int64Value(-1),
            Kind::Int64Value(i64::MAX),
            Kind::Uint64Value(u64::MAX),
            Kind::DoubleValue(-2.5),
            Kind::DoubleValue(f64::INFINITY),
            Kind::StringValue(String::new()),
            Kind::StringValue("grüße, 世界".into()),
            Kind::BytesValue(vec![0, 1, 255]),
            Kind::DecimalValue("-12345.6789".into()),
            Kind::DateValue(Date {
                year: 2026,
                month: 12,
                day: 3,
            }),
            Kind::TimestampValue(prost_types::Timestamp {
                seconds: 1_764_720_000,
                nanos: 5,
            }),
            Kind::UuidValue("123e4567-e89b-12d3-a456-426614174000".into()),
            Kind::JsonValue("{\"a\":[1,2]}".into()),
            Kind::ListValue(ListValue {
                values: vec![
                    Value {
                        kind: Some(Kind::Int64Value(7)),
                    },
                    Value { kind: None },
                ],
            }),
        ];
        kinds.into_iter().map(|k| Value { kind: Some(k) }).collect()
    }

    /// What `to_value` gives for a value prost decodes as `value`.
    fn normalized(value: &Value) -> Value {
        match &value.kind {
            None => Value {
                kind: Some(Kind::Null(true)),
            },
            Some(_) => value.clone(),
        }
    }

    #[test]
    fn raw_rows_read_as_prost_decodes_them() {
        let rows = vec![
            Row { values: every_kind() },
            Row { values: vec![] },
            Row {
                values: vec![Value { kind: None }],
            },
        ];
        let wire = ExecuteStreamResponse {
            payload: Some(Payload::Batch(RowBatch {
                rows: rows.clone(),
                encoded: Bytes::new(),
            })),
        }
        .encode_to_vec();
        let raw = RawExecuteStreamResponse::decode(wire.as_slice()).expect("decodes");
        let Some(RawPayload::Batch(batch)) = &raw.payload else {
            panic!("a batch: {raw:?}");
        };
        let read: Vec<Vec<Value>> = batch
            .iter()
            .map(|row| {
                row.expect("row")
                    .values()
                    .map(|v| v.expect("value").to_value())
                    .collect()
            })
            .collect();
        let want: Vec<Vec<Value>> = rows.iter().map(|r| r.values.iter().map(normalized).collect()).collect();
        assert_eq!(read, want);
        // Borrowed, not copied.
        let first = batch.iter().next().expect("row").expect("row");
        let text = first.values().nth(10).expect("value").expect("value");
        assert_eq!(text, ValueRef::String("grüße, 世界"));
        // And the same bytes again when encoded.
        assert_eq!(raw.encode_to_vec(), wire);
    }

    #[test]
    fn a_batch_in_two_fields_keeps_every_row() {
        let batch = |i| {
            ExecuteStreamResponse {
                payload: Some(Payload::Batch(RowBatch {
                    rows: vec![Row {
                        values: vec![Value {
                            kind: Some(Kind::Int64Value(i)),
                        }],
                    }],
                    encoded: Bytes::new(),
                })),
            }
            .encode_to_vec()
        };
        let wire = [batch(1), batch(2)].concat();
        let raw = RawExecuteStreamResponse::decode(wire.as_slice()).expect("decodes");
        let Some(RawPayload::Batch(rows)) = raw.payload else {
            panic!("a batch");
        };
        let mut read = Vec::new();
        for row in rows.iter() {
            for value in row.expect("row").values() {
                read.push(value.expect("value").to_value());
            }
        }
        let int = |i| Value {
            kind: Some(Kind::Int64Value(i)),
        };
        assert_eq!(read, vec![int(1), int(2)]);
    }

    #[test]
    fn metadata_and_stats_decode_as_messages() {
        for payload in [
            Payload::Metadata(ResultMetadata::default()),
            Payload::Stats(QueryStats {
                rows_returned: 3,
                ..Default::default()
            }),
        ] {
            let wire = ExecuteStreamResponse {
                payload: Some(payload.clone()),
            }
            .encode_to_vec();
            let raw = RawExecuteStreamResponse::decode(wire.as_slice()).expect("decodes");
            match (payload, raw.payload) {
                (Payload::Metadata(a), Some(RawPayload::Metadata(b))) => assert_eq!(a, b),
                (Payload::Stats(a), Some(RawPayload::Stats(b))) => assert_eq!(a, b),
                (a, b) => panic!("{a:?} read as {b:?}"),
            }
        }
    }

    #[test]
    fn broken_rows_are_errors_not_panics() {
        // A row field that claims more bytes than there are.
        let batch = RawRows {
            bytes: Bytes::from_static(&[0x0a, 0x05, 0x0a, 0x02]),
        };
        assert!(batch.iter().next().expect("an item").is_err());
        // A string value that is not UTF-8.
        let batch = RawRows {
            bytes: Bytes::from_static(&[0x0a, 0x06, 0x0a, 0x04, 0x32, 0x02, 0xff, 0xfe]),
        };
        let row = batch.iter().next().expect("a row").expect("row");
        assert!(row.values().next().expect("a value").is_err());
        // Every prefix of a valid batch reads to an end without panicking.
        let wire = RowBatch {
            rows: vec![Row { values: every_kind() }],
            encoded: Bytes::new(),
        }
        .encode_to_vec();
        for end in 0..wire.len() {
            let batch = RawRows {
                bytes: Bytes::copy_from_slice(&wire[..end]),
            };
            for row in batch.iter().flatten() {
                for _ in row.values() {}
            }
        }
    }

    fn any_kind() -> impl proptest::strategy::Strategy<Value = Option<Kind>> {
        use proptest::prelude::*;
        let text = || proptest::string::string_regex(".{0,40}").expect("a pattern");
        proptest::option::of(prop_oneof![
            Just(Kind::Null(true)),
            any::<bool>().prop_map(Kind::BoolValue),
            any::<i64>().prop_map(Kind::Int64Value),
            any::<u64>().prop_map(Kind::Uint64Value),
            any::<f64>().prop_map(Kind::DoubleValue),
            text().prop_map(Kind::StringValue),
            proptest::collection::vec(any::<u8>(), 0..200).prop_map(Kind::BytesValue),
            text().prop_map(Kind::DecimalValue),
            text().prop_map(Kind::UuidValue),
            text().prop_map(Kind::JsonValue),
            (any::<i32>(), any::<i32>(), any::<i32>()).prop_map(|(year, month, day)| Kind::DateValue(Date {
                year,
                month,
                day
            })),
        ])
    }

    /// A message of fields of any number and wire type, with bodies of any
    /// bytes: what a damaged or foreign `Value` could hold.
    fn any_fields() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let field = (
            1u32..20,
            prop_oneof![Just(0u8), Just(1), Just(2), Just(5)],
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..12),
        );
        proptest::collection::vec(field, 0..4).prop_map(|fields| {
            let mut out = Vec::new();
            for (tag, wire_type, number, bytes) in fields {
                encoding::encode_key(
                    tag,
                    WireType::try_from(u64::from(wire_type)).expect("a wire type"),
                    &mut out,
                );
                match wire_type {
                    0 => encoding::encode_varint(number, &mut out),
                    2 => {
                        encoding::encode_varint(bytes.len() as u64, &mut out);
                        out.extend_from_slice(&bytes);
                    }
                    // Fixed widths, some cut short.
                    1 => out.extend_from_slice(bytes.get(..8).unwrap_or(&bytes)),
                    _ => out.extend_from_slice(bytes.get(..4).unwrap_or(&bytes)),
                }
            }
            out
        })
    }

    proptest::proptest! {
        #[test]
        fn any_rows_read_as_prost_decodes_them(rows in proptest::collection::vec(
            proptest::collection::vec(any_kind(), 0..6), 0..5)
        ) {
            let rows: Vec<Row> = rows
                .into_iter()
                .map(|kinds| Row { values: kinds.into_iter().map(|kind| Value { kind }).collect() })
                .collect();
            let batch = RawRows { bytes: RowBatch { rows: rows.clone(), encoded: Bytes::new() }.encode_to_vec().into() };
            let read: Vec<Vec<Value>> = batch
                .iter()
                .map(|row| row.expect("row").values().map(|v| v.expect("value").to_value()).collect())
                .collect();
            let want: Vec<Vec<Value>> = rows.iter().map(|r| r.values.iter().map(normalized).collect()).collect();
            proptest::prop_assert_eq!(read, want);
        }

        /// Whatever the bytes, a value reads as prost reads it, or fails where prost fails.
        #[test]
        fn any_value_message_reads_as_prost_reads_it(message in any_fields()) {
            let raw = ValueRef::read(&message).map(|v| v.to_value());
            let prost = Value::decode(message.as_slice()).map(|v| normalized(&v));
            match (raw, prost) {
                (Ok(raw), Ok(prost)) => proptest::prop_assert_eq!(raw, prost),
                (Err(_), Err(_)) => {}
                (raw, prost) => proptest::prop_assert!(false, "raw {raw:?}, prost {prost:?}"),
            }
        }

        /// Any bytes at all: an error or a value, never a panic.
        #[test]
        fn any_bytes_read_without_panicking(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let batch = RawRows { bytes: bytes.into() };
            for row in batch.iter().flatten() {
                for _ in row.values() {}
            }
        }
    }

    #[test]
    fn varints_of_every_width_and_their_limits() {
        for value in [0, 1, 127, 128, 16_383, 16_384, u64::from(u32::MAX), 1 << 56, u64::MAX] {
            let mut wire = Vec::new();
            encoding::encode_varint(value, &mut wire);
            wire.push(0x42);
            let mut rest = wire.as_slice();
            assert_eq!(varint(&mut rest), Ok(value));
            assert_eq!(rest, &[0x42]);
        }
        // Eleven bytes, and a tenth byte past the 64th bit.
        assert!(varint(&mut [0xff; 11].as_slice()).is_err());
        let mut too_big = vec![0xff; 9];
        too_big.push(0x02);
        assert!(varint(&mut too_big.as_slice()).is_err());
        // Cut short.
        assert!(varint(&mut [0x80, 0x80].as_slice()).is_err());
        assert!(varint(&mut [].as_slice()).is_err());
    }

    #[test]
    fn a_value_of_a_million_message_kinds_reads_in_one_pass() {
        // A million `date_value` fields: read field by field with a decode
        // of the whole message each, this would take hours.
        let message: Vec<u8> = [0x4a, 0x00].repeat(1_000_000);
        let (done, read) = std::sync::mpsc::channel();
        let copy = message.clone();
        std::thread::spawn(move || {
            let _ = done.send(ValueRef::read(&copy).map(|v| v.to_value()));
        });
        let read = read
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("read within a minute");
        let prost = Value::decode(message.as_slice()).expect("prost reads it");
        assert_eq!(read, Ok(prost));
    }

    #[test]
    fn an_earlier_batch_cut_short_fails_as_in_prost() {
        // A batch whose one row key has no length, then a batch holding one byte.
        let wire = [0x12, 0x01, 0x0a, 0x12, 0x01, 0x00];
        assert!(ExecuteStreamResponse::decode(wire.as_slice()).is_err());
        assert!(RawExecuteStreamResponse::decode(wire.as_slice()).is_err());
    }

    #[test]
    fn arrow_pieces_read_as_prost_reads_them() {
        let piece = ExecuteStreamResponse {
            payload: Some(Payload::ArrowIpc(vec![1, 2, 3])),
        }
        .encode_to_vec();
        let raw = RawExecuteStreamResponse::decode(piece.as_slice()).expect("decodes");
        assert_eq!(raw.payload, Some(RawPayload::ArrowIpc(vec![1, 2, 3])));
        assert_eq!(raw.encode_to_vec(), piece);
        // The last payload wins, as in prost.
        let batch = ExecuteStreamResponse {
            payload: Some(Payload::Batch(RowBatch::default())),
        }
        .encode_to_vec();
        let both = [batch, piece].concat();
        let raw = RawExecuteStreamResponse::decode(both.as_slice()).expect("decodes");
        assert_eq!(raw.payload, Some(RawPayload::ArrowIpc(vec![1, 2, 3])));
        // A piece that is not length-delimited fails, as in prost.
        assert!(ExecuteStreamResponse::decode([0x20, 0x01].as_slice()).is_err());
        assert!(RawExecuteStreamResponse::decode([0x20, 0x01].as_slice()).is_err());
    }
}
