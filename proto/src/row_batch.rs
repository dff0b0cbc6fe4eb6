//! `weir.v1.RowBatch`, written by hand instead of generated: the server
//! encodes each row as it arrives from the engine, so a batch can carry rows
//! already in wire form. On the wire it is the message of `query.proto`
//! (`repeated Row rows = 1`); clients decode it into `rows` as before.

use prost::bytes::{Buf, BufMut, Bytes};
use prost::encoding::{self, DecodeContext, WireType};
use prost::{DecodeError, Message};

use crate::v1::Row;

/// A batch of result rows.
#[derive(Clone, PartialEq, Default, Debug)]
pub struct RowBatch {
    /// Rows as messages: what a decoded batch holds.
    pub rows: Vec<Row>,
    /// Rows already encoded as `rows` fields (field 1, length-delimited
    /// `Row` messages), sent ahead of `rows` as they are. Empty in a
    /// decoded batch.
    pub encoded: Bytes,
}

impl Message for RowBatch {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.encoded);
        for row in &self.rows {
            encoding::message::encode(1, row, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        if tag == 1 {
            encoding::message::merge_repeated(wire_type, &mut self.rows, buf, ctx).map_err(|mut e| {
                e.push("RowBatch", "rows");
                e
            })
        } else {
            encoding::skip_field(wire_type, tag, buf, ctx)
        }
    }

    fn encoded_len(&self) -> usize {
        self.encoded.len() + encoding::message::encoded_len_repeated(1, &self.rows)
    }

    fn clear(&mut self) {
        self.rows.clear();
        self.encoded = Bytes::new();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::v1::{value::Kind, Value};

    /// A row of an integer, a text and a NULL.
    pub(crate) fn row(i: i64, s: &str) -> Row {
        Row {
            values: vec![
                Value {
                    kind: Some(Kind::Int64Value(i)),
                },
                Value {
                    kind: Some(Kind::StringValue(s.into())),
                },
                Value { kind: None },
            ],
        }
    }

    #[test]
    fn encoded_rows_decode_as_rows() {
        let mut buf = Vec::new();
        for i in 0..3 {
            encoding::message::encode(1, &row(i, "x"), &mut buf);
        }
        let batch = RowBatch {
            rows: vec![row(3, "later")],
            encoded: buf.into(),
        };
        let wire = batch.encode_to_vec();
        assert_eq!(wire.len(), batch.encoded_len());
        let decoded = RowBatch::decode(wire.as_slice()).expect("decodes");
        let want: Vec<Row> = (0..3).map(|i| row(i, "x")).chain([row(3, "later")]).collect();
        assert_eq!(decoded.rows, want);
        assert!(decoded.encoded.is_empty());
        // The same bytes as a batch built from messages alone.
        let plain = RowBatch {
            rows: want,
            encoded: Bytes::new(),
        };
        assert_eq!(plain.encode_to_vec(), wire);
    }

    #[test]
    fn unknown_fields_are_skipped() {
        let mut wire = RowBatch {
            rows: vec![row(1, "a")],
            encoded: Bytes::new(),
        }
        .encode_to_vec();
        // Field 2, varint 7: a field a newer server might add.
        wire.extend_from_slice(&[0x10, 0x07]);
        let decoded = RowBatch::decode(wire.as_slice()).expect("decodes");
        assert_eq!(decoded.rows, vec![row(1, "a")]);
    }
}
