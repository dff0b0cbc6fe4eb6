//! SchemaService: sources, their capabilities, and what is in them.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use weir_proto::v1 as pb;
use weir_proto::v1::schema_service_server::SchemaService;

use super::{caller, convert, source, statement_timeout, Gate};
use crate::backend::TablePage;
use crate::config::Priority;
use crate::error::Error;
use crate::tenant::{Caller, Source};

pub struct SchemaApi {
    gate: Gate,
}

impl SchemaApi {
    pub fn new(gate: Gate) -> Self {
        Self { gate }
    }
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

fn source_info(s: &Arc<Source>) -> pb::SourceInfo {
    let status = s.status.read().clone();
    let caps = s.backend.capabilities();
    pb::SourceInfo {
        name: s.name.clone(),
        engine: convert::engine(s.backend.engine()) as i32,
        server_version: status.server_version,
        read_only: s.config.read_only,
        healthy: status.healthy,
        capabilities: Some(pb::Capabilities {
            query: caps.query,
            transactions: caps.transactions,
            isolation_levels: caps
                .isolation_levels
                .into_iter()
                .map(|l| convert::isolation_to_proto(l) as i32)
                .collect(),
            bulk_load_modes: caps
                .load_modes
                .into_iter()
                .map(|m| convert::load_mode_to_proto(m) as i32)
                .collect(),
            change_streams: caps.change_streams,
            kafka: caps.kafka,
            parameter_style: caps.parameter_style.to_string(),
        }),
    }
}

/// The caller's statement timeout as a time to end by: the catalog calls
/// one request makes share it (ListTables may make three).
struct Budget {
    until: tokio::time::Instant,
    total: std::time::Duration,
}

impl Budget {
    fn of(caller: &Caller) -> Self {
        let total = statement_timeout(caller);
        Budget {
            until: tokio::time::Instant::now() + total,
            total,
        }
    }
}

/// Runs a catalog call within what is left of the request's budget.
async fn timed<T>(
    budget: &Budget,
    f: impl std::future::Future<Output = Result<T, crate::backend::BackendError>>,
) -> Result<T, Error> {
    Ok(tokio::time::timeout_at(budget.until, f)
        .await
        .map_err(|_| Error::Timeout(budget.total))??)
}

#[tonic::async_trait]
impl SchemaService for SchemaApi {
    async fn list_sources(
        &self,
        request: Request<pb::ListSourcesRequest>,
    ) -> Result<Response<pb::ListSourcesResponse>, Status> {
        let caller = caller(&request)?;
        let sources = caller.tenant.sources().map(|s| source_info(&s)).collect();
        Ok(Response::new(pb::ListSourcesResponse { sources }))
    }

    async fn test_connection(
        &self,
        request: Request<pb::TestConnectionRequest>,
    ) -> Result<Response<pb::TestConnectionResponse>, Status> {
        let caller = caller(&request)?;
        let source = source(&caller, &request.get_ref().source)?;
        let _admitted = self.gate.admit(&caller, Priority::default()).await?;
        let timeout = statement_timeout(&caller);
        let result = match tokio::time::timeout(timeout, source.backend.connection_info()).await {
            Ok(result) => result,
            // The caller's own deadline came first: that says nothing of the source.
            Err(_) if timeout < caller.tenant.limits.statement_timeout => return Err(Error::Timeout(timeout).into()),
            // A wait for a busy pool is no answer either (the health probe's rule).
            Err(_) if crate::health::pool_is_full(&source) => Err(crate::backend::BackendError::PoolExhausted {
                max_size: source.config.pool.max_size,
                waited: timeout,
            }),
            Err(_) => Err(crate::backend::BackendError::Unavailable(format!(
                "the source did not answer within {timeout:?}"
            ))),
        };
        match &result {
            Ok(info) => source.status.write().answered(Some(info.server_version.clone())),
            // Busy, not down: every connection is in use, here or on the server.
            Err(e) if e.is_busy() => {}
            // As a probe's: one failure puts a source that was up in doubt,
            // and its time limit may be far shorter than a probe's.
            Err(_) => source.probe_failed(&caller.tenant.id),
        }
        let info = result?;
        Ok(Response::new(pb::TestConnectionResponse {
            engine: convert::engine(source.backend.engine()) as i32,
            server_version: info.server_version,
            round_trip: Some(convert::duration(info.round_trip)),
            database: info.database,
            user: info.user,
            brokers: info.brokers,
            cluster_id: info.cluster_id,
        }))
    }

    async fn list_schemas(
        &self,
        request: Request<pb::ListSchemasRequest>,
    ) -> Result<Response<pb::ListSchemasResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.get_ref();
        let source = source(&caller, &r.source)?;
        let _admitted = self.gate.admit(&caller, Priority::default()).await?;
        let budget = Budget::of(&caller);
        let schemas = timed(&budget, source.backend.sql()?.list_schemas(r.include_system)).await?;
        Ok(Response::new(pb::ListSchemasResponse {
            schemas: schemas
                .into_iter()
                .map(|s| pb::SchemaInfo {
                    name: s.name,
                    system: s.system,
                })
                .collect(),
        }))
    }

    async fn list_tables(
        &self,
        request: Request<pb::ListTablesRequest>,
    ) -> Result<Response<pb::ListTablesResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.get_ref();
        // Checked first: a request that can never succeed waits for no slot.
        let page_size = u32::try_from(r.page_size).map_err(|_| Error::InvalidArgument {
            field: "page_size",
            message: "page_size may not be negative (0 lists every table in one answer)".into(),
        })?;
        let after = page_token::read(r)?;
        let source = source(&caller, &r.source)?;
        let _admitted = self.gate.admit(&caller, Priority::default()).await?;
        let budget = Budget::of(&caller);
        let sql = source.backend.sql()?;
        let schema = non_empty(&r.schema);
        let first_page = after.is_none();
        // One more than asked for tells whether another page follows.
        let page = TablePage {
            after,
            limit: (page_size > 0).then(|| page_size.saturating_add(1)),
        };
        let mut tables = timed(&budget, sql.list_tables(schema, page)).await?;
        let next_page_token = match usize::try_from(page_size) {
            Ok(size) if size > 0 && tables.len() > size => {
                tables.truncate(size);
                tables.last().map(|last| page_token::write(r, last)).unwrap_or_default()
            }
            _ => String::new(),
        };
        // An empty list for a schema that is not there (or not the source's
        // to use) would pass a typo off as an empty schema. (A later page
        // may be empty: its tables were dropped since the previous one.)
        if let (Some(schema), true, true) = (schema, tables.is_empty(), first_page) {
            let schemas = timed(&budget, sql.list_schemas(true)).await?;
            let exists = match schemas.iter().find(|s| s.name == schema) {
                Some(_) => true,
                // PostgreSQL: another case is another schema, empty or not.
                None if sql.capabilities().schema_names_exact => false,
                // Only in another case: whether the engine takes it for the
                // same name (SQL Server's usual collations, SQLite, MySQL's
                // lower_case_table_names) or not (PostgreSQL) is told by
                // what the listing under the stored name finds: tables there
                // mean the one asked for is another name. (An empty schema
                // cannot tell, and is taken as found.)
                None => match schemas.iter().find(|s| s.name.eq_ignore_ascii_case(schema)) {
                    Some(stored) => {
                        let one = TablePage {
                            after: None,
                            limit: Some(1),
                        };
                        timed(&budget, sql.list_tables(Some(&stored.name), one))
                            .await?
                            .is_empty()
                    }
                    None => false,
                },
            };
            if !exists {
                return Err(Error::Backend(crate::backend::BackendError::not_found(format!(
                    "schema {schema:?} not found (or the source's user may not use it)"
                )))
                .into());
            }
        }
        Ok(Response::new(pb::ListTablesResponse {
            tables: tables.into_iter().map(convert::table).collect(),
            next_page_token,
        }))
    }

    async fn describe_table(
        &self,
        request: Request<pb::DescribeTableRequest>,
    ) -> Result<Response<pb::DescribeTableResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.get_ref();
        if r.table.is_empty() {
            return Err(Error::InvalidArgument {
                field: "table",
                message: "a table name is required".into(),
            }
            .into());
        }
        let source = source(&caller, &r.source)?;
        super::record_object(&r.table);
        let _admitted = self.gate.admit(&caller, Priority::default()).await?;
        let budget = Budget::of(&caller);
        let description = timed(
            &budget,
            source.backend.sql()?.describe_table(non_empty(&r.schema), &r.table),
        )
        .await?;
        Ok(Response::new(convert::description(description)))
    }
}

/// ListTables page tokens: where the previous page ended, and the call it
/// belongs to, since the same place in another source's or schema's list
/// would start a page somewhere else. Not secret (the caller was shown that
/// table), so not sealed; base64 so that it is opaque text.
mod page_token {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    use serde::{Deserialize, Serialize};
    use weir_proto::v1 as pb;

    use crate::backend::TableInfo;
    use crate::error::Error;

    #[derive(Serialize, Deserialize)]
    struct Token {
        source: String,
        schema: String,
        after: (String, String),
    }

    pub fn write(request: &pb::ListTablesRequest, last: &TableInfo) -> String {
        let token = Token {
            source: request.source.clone(),
            schema: request.schema.clone(),
            after: (last.schema.clone(), last.name.clone()),
        };
        // Serialising strings into a Vec does not fail.
        serde_json::to_vec(&token)
            .map(|json| URL_SAFE_NO_PAD.encode(json))
            .unwrap_or_default()
    }

    /// Where the page asked for begins: after the table named in the token.
    pub fn read(request: &pb::ListTablesRequest) -> Result<Option<(String, String)>, Error> {
        if request.page_token.is_empty() {
            return Ok(None);
        }
        let invalid = |message: &str| Error::InvalidArgument {
            field: "page_token",
            message: message.into(),
        };
        let token: Token = URL_SAFE_NO_PAD
            .decode(&request.page_token)
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok())
            .ok_or_else(|| invalid("not a page token of ListTables: pass next_page_token as it was returned"))?;
        if token.source != request.source || token.schema != request.schema {
            return Err(invalid(
                "the page token was returned for another source or schema: \
                 page on with the source and schema of the first call, or start again without a token",
            ));
        }
        Ok(Some(token.after))
    }
}
