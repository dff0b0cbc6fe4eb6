//! The `pgoutput` logical decoding message format (protocol version 1,
//! binary tuples), as returned by `pg_logical_slot_peek_binary_changes`.
//! Reference: "Logical Replication Message Formats" in the PostgreSQL docs.

/// One column value of a tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datum<'a> {
    Null,
    /// A TOASTed value the update did not change; pgoutput does not resend it.
    Unchanged,
    Text(&'a [u8]),
    Binary(&'a [u8]),
}

pub type Tuple<'a> = Vec<Datum<'a>>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity (the primary key, or every column with REPLICA IDENTITY FULL).
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
    pub typmod: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    pub schema: String,
    pub name: String,
    /// 'd' default (primary key), 'n' nothing, 'f' full, 'i' index.
    pub identity: u8,
    pub columns: Vec<RelationColumn>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    Begin {
        /// LSN of the commit record: the transaction's place in commit order.
        final_lsn: u64,
        /// Microseconds since 2000-01-01 UTC.
        commit_time: i64,
        xid: u32,
    },
    Commit {
        /// LSN just past the commit record: acknowledging it skips the transaction.
        end_lsn: u64,
        commit_time: i64,
    },
    Relation(Relation),
    Insert {
        relation: u32,
        new: Tuple<'a>,
    },
    Update {
        relation: u32,
        /// The old row: only the key columns (`key_only`), or all with REPLICA IDENTITY FULL.
        old: Option<Tuple<'a>>,
        key_only: bool,
        new: Tuple<'a>,
    },
    Delete {
        relation: u32,
        old: Tuple<'a>,
        key_only: bool,
    },
    Truncate {
        relations: Vec<u32>,
    },
    /// Origin, type and logical messages: nothing a change stream reports.
    Other,
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.buf.len() < n {
            return Err("truncated pgoutput message".into());
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn i16(&mut self) -> Result<i16, String> {
        Ok(i16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn i32(&mut self) -> Result<i32, String> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, String> {
        Ok(i64::from_be_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String, String> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or("unterminated string in pgoutput message")?;
        let s = String::from_utf8_lossy(self.take(end)?).into_owned();
        self.take(1)?;
        Ok(s)
    }

    fn tuple(&mut self) -> Result<Tuple<'a>, String> {
        let n = self.i16()?;
        let mut out = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
        for _ in 0..n {
            out.push(match self.u8()? {
                b'n' => Datum::Null,
                b'u' => Datum::Unchanged,
                kind @ (b't' | b'b') => {
                    let len = usize::try_from(self.i32()?).map_err(|_| "negative datum length")?;
                    let bytes = self.take(len)?;
                    if kind == b't' {
                        Datum::Text(bytes)
                    } else {
                        Datum::Binary(bytes)
                    }
                }
                other => return Err(format!("unknown tuple datum kind {:?}", other as char)),
            });
        }
        Ok(out)
    }
}

pub fn parse(data: &[u8]) -> Result<Message<'_>, String> {
    let mut r = Reader { buf: data };
    Ok(match r.u8()? {
        b'B' => Message::Begin {
            final_lsn: r.u64()?,
            commit_time: r.i64()?,
            xid: r.u32()?,
        },
        b'C' => {
            let _flags = r.u8()?;
            let _commit_lsn = r.u64()?;
            Message::Commit {
                end_lsn: r.u64()?,
                commit_time: r.i64()?,
            }
        }
        b'R' => {
            let id = r.u32()?;
            let schema = r.string()?;
            let name = r.string()?;
            let identity = r.u8()?;
            let n = r.i16()?;
            let mut columns = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
            for _ in 0..n {
                columns.push(RelationColumn {
                    key: r.u8()? & 1 == 1,
                    name: r.string()?,
                    type_oid: r.u32()?,
                    typmod: r.i32()?,
                });
            }
            Message::Relation(Relation {
                id,
                schema,
                name,
                identity,
                columns,
            })
        }
        b'I' => {
            let relation = r.u32()?;
            expect(&mut r, b'N')?;
            Message::Insert {
                relation,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let relation = r.u32()?;
            let (mut old, mut key_only) = (None, false);
            let mut kind = r.u8()?;
            if kind == b'K' || kind == b'O' {
                key_only = kind == b'K';
                old = Some(r.tuple()?);
                kind = r.u8()?;
            }
            if kind != b'N' {
                return Err(format!("unexpected update tuple kind {:?}", kind as char));
            }
            Message::Update {
                relation,
                old,
                key_only,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation = r.u32()?;
            let kind = r.u8()?;
            if kind != b'K' && kind != b'O' {
                return Err(format!("unexpected delete tuple kind {:?}", kind as char));
            }
            Message::Delete {
                relation,
                key_only: kind == b'K',
                old: r.tuple()?,
            }
        }
        b'T' => {
            let n = r.u32()?;
            let _options = r.u8()?;
            let relations = (0..n).map(|_| r.u32()).collect::<Result<_, _>>()?;
            Message::Truncate { relations }
        }
        _ => Message::Other,
    })
}

fn expect(r: &mut Reader<'_>, tag: u8) -> Result<(), String> {
    match r.u8()? {
        t if t == tag => Ok(()),
        t => Err(format!("expected tuple kind {:?}, got {:?}", tag as char, t as char)),
    }
}

/// `pg_lsn` text form, as SQL functions take it.
pub fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Whatever the server sends, the parser answers or errs; it never panics or reads past the end.
        #[test]
        fn any_bytes_parse_or_err(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = parse(&bytes);
        }

        /// The same for every message tag with an arbitrary body.
        #[test]
        fn any_body_of_each_message_parses_or_errs(
            tag in proptest::sample::select(b"BCRIUDTYOM".to_vec()),
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..128),
        ) {
            let mut bytes = vec![tag];
            bytes.extend(body);
            let _ = parse(&bytes);
        }
    }

    /// Messages captured from PostgreSQL 15 (`INSERT INTO t VALUES (1, 'a', 1.5)`
    /// on `t(id int primary key, v text, n numeric)`).
    const BEGIN: &[u8] = b"B\x00\x00\x00\x00\x01\xd9\xf3\x68\x00\x03\x04\x99\x12\x19\x01\xc8\x00\x00\x02\xda";
    const RELATION: &[u8] = b"R\x00\x00\x40\x03public\x00cdc_t\x00d\x00\x03\x01id\x00\x00\x00\x00\x17\xff\xff\xff\xff\x00v\x00\x00\x00\x00\x19\xff\xff\xff\xff\x00n\x00\x00\x00\x06\xa4\xff\xff\xff\xff";
    const INSERT: &[u8] = b"I\x00\x00\x40\x03N\x00\x03b\x00\x00\x00\x04\x00\x00\x00\x01b\x00\x00\x00\x01ab\x00\x00\x00\x0c\x00\x02\x00\x00\x00\x00\x00\x01\x00\x01\x13\x88";
    const DELETE: &[u8] = b"D\x00\x00\x40\x03K\x00\x03b\x00\x00\x00\x04\x00\x00\x00\x02nn";
    const COMMIT: &[u8] =
        b"C\x00\x00\x00\x00\x00\x01\xd9\xf3\x68\x00\x00\x00\x00\x01\xd9\xf3\x98\x00\x03\x04\x99\x12\x19\x01\xc8";

    #[test]
    fn parses_a_transaction() {
        let Message::Begin { final_lsn, xid, .. } = parse(BEGIN).expect("begin") else {
            panic!("not a begin")
        };
        assert_eq!((final_lsn, xid), (0x1D9F368, 730));
        let Message::Relation(rel) = parse(RELATION).expect("relation") else {
            panic!("not a relation")
        };
        assert_eq!(
            (rel.id, rel.schema.as_str(), rel.name.as_str(), rel.identity),
            (16387, "public", "cdc_t", b'd')
        );
        let names: Vec<_> = rel
            .columns
            .iter()
            .map(|c| (c.name.as_str(), c.key, c.type_oid))
            .collect();
        assert_eq!(names, [("id", true, 23), ("v", false, 25), ("n", false, 1700)]);
        let Message::Insert { relation, new } = parse(INSERT).expect("insert") else {
            panic!("not an insert")
        };
        assert_eq!(relation, 16387);
        assert_eq!(new[0], Datum::Binary(&[0, 0, 0, 1]));
        assert_eq!(new[1], Datum::Binary(b"a"));
        let Message::Delete { old, key_only, .. } = parse(DELETE).expect("delete") else {
            panic!("not a delete")
        };
        assert!(key_only);
        assert_eq!(old[1..], [Datum::Null, Datum::Null]);
        let Message::Commit { end_lsn, .. } = parse(COMMIT).expect("commit") else {
            panic!("not a commit")
        };
        assert_eq!(end_lsn, 0x1D9F398);
    }

    #[test]
    fn truncated_messages_are_errors_not_panics() {
        for msg in [BEGIN, RELATION, INSERT, DELETE, COMMIT] {
            for cut in 1..msg.len() {
                assert!(parse(&msg[..cut]).is_err(), "cut at {cut} of {:?}", msg[0] as char);
            }
        }
        assert!(parse(b"").is_err());
    }

    #[test]
    fn lsn_text_matches_postgres() {
        assert_eq!(lsn_text(0x1D9F200), "0/1D9F200");
        assert_eq!(lsn_text((3 << 32) | 0xAB), "3/AB");
    }
}
