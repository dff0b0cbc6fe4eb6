//! Spans of calls reach an OTLP collector with their attributes, continuing
//! the caller's W3C trace. Alone in its binary: it installs the global
//! tracing subscriber.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio_stream::wrappers::TcpListenerStream;
use weir_client::weir_proto::v1 as pb;
use weir_server::config::TelemetryConfig;
use weir_server::telemetry::{self, LogFormat};

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = request
            .into_inner()
            .resource_spans
            .into_iter()
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans);
        self.0.lock().expect("collector lock").extend(spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn attribute(span: &Span, key: &str) -> Option<AnyValue> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.clone())
        .and_then(|v| v.value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_exported_as_spans_with_their_attributes() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let service = TraceServiceServer::new(collector.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let telemetry = telemetry::init(
        LogFormat::Text,
        &TelemetryConfig {
            otlp_endpoint: Some(endpoint),
            service_name: Some("weir-test".into()),
            otlp_ca_file: None,
        },
    )
    .expect("telemetry");

    let server = TestServer::start(&tenant("tr", "", &sqlite_demo("tr", "db"))).await;
    let client = server.client("key-tr").await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_id = "00f067aa0ba902b7";
    let mut request = tonic::Request::new(pb::ExecuteRequest {
        source: "db".into(),
        sql: "SELECT id FROM customers LIMIT 3".into(),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{parent_id}-01").parse().expect("header"),
    );
    let response = client.query().execute(request).await.expect("execute").into_inner();
    assert_eq!(response.rows.len(), 3);

    let deadline = Instant::now() + Duration::from_secs(10);
    let span = loop {
        telemetry.flush();
        let found = collector
            .0
            .lock()
            .expect("lock")
            .iter()
            .find(|s| s.name == "/weir.v1.QueryService/Execute")
            .cloned();
        if let Some(span) = found {
            break span;
        }
        assert!(Instant::now() < deadline, "no span reached the collector");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(hex::encode(&span.trace_id), trace_id, "the caller's trace is continued");
    assert_eq!(hex::encode(&span.parent_span_id), parent_id);
    assert_eq!(attribute(&span, "tenant"), Some(AnyValue::StringValue("tr".into())));
    assert_eq!(attribute(&span, "source"), Some(AnyValue::StringValue("db".into())));
    assert_eq!(attribute(&span, "engine"), Some(AnyValue::StringValue("sqlite".into())));
    assert_eq!(attribute(&span, "rows"), Some(AnyValue::IntValue(3)));
    assert!(matches!(attribute(&span, "bytes"), Some(AnyValue::IntValue(b)) if b > 0));
    assert_eq!(attribute(&span, "code"), Some(AnyValue::StringValue("Ok".into())));
    let engine_span = collector
        .0
        .lock()
        .expect("lock")
        .iter()
        .any(|s| s.name == "engine.start" && s.trace_id == span.trace_id);
    assert!(engine_span, "engine time is a child span");
    server.stop().await;
    telemetry.shutdown();
}
