//! `weir.v1.ExecuteResponse`, written by hand instead of generated, as
//! [`RowBatch`](crate::row_batch::RowBatch) is: the server encodes a unary
//! result's rows as the engine hands their values over, so the response can
//! carry rows already in wire form. On the wire it is the message of
//! `query.proto`; clients decode it into `rows` as before.

use prost::bytes::{Buf, BufMut, Bytes};
use prost::encoding::{self, DecodeContext, WireType};
use prost::{DecodeError, Message};

use crate::v1::{Column, QueryStats, Row};

/// The field number of `rows`, for encoders that write them ahead.
pub const ROWS_FIELD: u32 = 2;

/// The whole result of a unary `Execute`.
#[derive(Clone, PartialEq, Default, Debug)]
pub struct ExecuteResponse {
    pub columns: Vec<Column>,
    /// Rows as messages: what a decoded response holds.
    pub rows: Vec<Row>,
    pub stats: Option<QueryStats>,
    /// Rows already encoded as `rows` fields (field 2, length-delimited
    /// `Row` messages), sent ahead of `rows` as they are. Empty in a
    /// decoded response.
    pub encoded_rows: Bytes,
}

impl Message for ExecuteResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        for column in &self.columns {
            encoding::message::encode(1, column, buf);
        }
        buf.put_slice(&self.encoded_rows);
        for row in &self.rows {
            encoding::message::encode(ROWS_FIELD, row, buf);
        }
        if let Some(stats) = &self.stats {
            encoding::message::encode(3, stats, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        let (result, field) = match tag {
            1 => (
                encoding::message::merge_repeated(wire_type, &mut self.columns, buf, ctx),
                "columns",
            ),
            ROWS_FIELD => (
                encoding::message::merge_repeated(wire_type, &mut self.rows, buf, ctx),
                "rows",
            ),
            3 => (
                encoding::message::merge(wire_type, self.stats.get_or_insert_with(Default::default), buf, ctx),
                "stats",
            ),
            _ => return encoding::skip_field(wire_type, tag, buf, ctx),
        };
        result.map_err(|mut e| {
            e.push("ExecuteResponse", field);
            e
        })
    }

    fn encoded_len(&self) -> usize {
        encoding::message::encoded_len_repeated(1, &self.columns)
            + self.encoded_rows.len()
            + encoding::message::encoded_len_repeated(ROWS_FIELD, &self.rows)
            + self.stats.as_ref().map_or(0, |s| encoding::message::encoded_len(3, s))
    }

    fn clear(&mut self) {
        self.columns.clear();
        self.rows.clear();
        self.stats = None;
        self.encoded_rows = Bytes::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::row_batch::tests::row;

    /// What prost generates from `query.proto`, to compare the wire with.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Generated {
        #[prost(message, repeated, tag = "1")]
        columns: Vec<Column>,
        #[prost(message, repeated, tag = "2")]
        rows: Vec<Row>,
        #[prost(message, optional, tag = "3")]
        stats: Option<QueryStats>,
    }

    fn columns() -> Vec<Column> {
        ["id", "name"]
            .into_iter()
            .map(|name| Column {
                name: name.into(),
                ..Default::default()
            })
            .collect()
    }

    fn stats() -> QueryStats {
        QueryStats {
            rows_returned: 4,
            bytes_returned: 40,
            ..Default::default()
        }
    }

    #[test]
    fn the_wire_is_the_generated_messages() {
        let rows: Vec<Row> = (0..4).map(|i| row(i, "x")).collect();
        let generated = Generated {
            columns: columns(),
            rows: rows.clone(),
            stats: Some(stats()),
        };
        let mut encoded = Vec::new();
        for r in &rows[..3] {
            encoding::message::encode(ROWS_FIELD, r, &mut encoded);
        }
        let written = ExecuteResponse {
            columns: columns(),
            rows: rows[3..].to_vec(),
            stats: Some(stats()),
            encoded_rows: encoded.into(),
        };
        let wire = written.encode_to_vec();
        assert_eq!(wire, generated.encode_to_vec());
        assert_eq!(wire.len(), written.encoded_len());
        let decoded = ExecuteResponse::decode(wire.as_slice()).expect("decodes");
        assert_eq!(
            (decoded.columns, decoded.rows, decoded.stats),
            (columns(), rows, Some(stats()))
        );
        assert!(decoded.encoded_rows.is_empty());
    }

    #[test]
    fn fields_of_any_order_and_unknown_fields_decode_as_prost_decodes_them() {
        let mut wire = Generated {
            columns: Vec::new(),
            rows: vec![row(1, "a")],
            stats: Some(stats()),
        }
        .encode_to_vec();
        // A column after the stats, then field 9, varint 7: a field a newer server might add.
        encoding::message::encode(1, &columns()[0], &mut wire);
        wire.extend_from_slice(&[0x48, 0x07]);
        let ours = ExecuteResponse::decode(wire.as_slice()).expect("decodes");
        let theirs = Generated::decode(wire.as_slice()).expect("decodes");
        assert_eq!(
            (ours.columns, ours.rows, ours.stats),
            (theirs.columns, theirs.rows, theirs.stats)
        );
        // A cut message fails as prost fails, naming the field.
        let err = ExecuteResponse::decode(&wire[..wire.len() - 4]).expect_err("cut");
        assert!(Generated::decode(&wire[..wire.len() - 4]).is_err());
        assert!(err.to_string().contains("ExecuteResponse"), "{err}");
    }
}
