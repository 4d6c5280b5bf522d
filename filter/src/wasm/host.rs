//! [`Host`] over proxy-wasm `hostcalls`, for a stream or the root context; the only code that
//! calls the host for a request.

#[allow(clippy::wildcard_imports)] // the edge's types and imports
use super::*;

pub(super) fn grpc_status_code(status: u32) -> proxy_wasm::types::GrpcStatusCode {
    use proxy_wasm::types::GrpcStatusCode as C;
    match status {
        0 => C::Ok,
        1 => C::Cancelled,
        3 => C::InvalidArgument,
        4 => C::DeadlineExceeded,
        5 => C::NotFound,
        6 => C::AlreadyExists,
        7 => C::PermissionDenied,
        8 => C::ResourceExhausted,
        9 => C::FailedPrecondition,
        10 => C::Aborted,
        11 => C::OutOfRange,
        12 => C::Unimplemented,
        13 => C::Internal,
        14 => C::Unavailable,
        15 => C::DataLoss,
        16 => C::Unauthenticated,
        _ => C::Unknown,
    }
}

pub(super) fn log(level: LogLevel, message: &str) {
    // Nothing sensible is left to do if logging itself fails.
    let _ = hostcalls::log(level, message);
}

pub(super) fn host_error(call: &'static str) -> impl Fn(Status) -> HostError {
    move |status| HostError {
        call,
        status: format!("{status:?}"),
    }
}

/// Header values as text: valid UTF-8 keeps its buffer (no copy per header); anything else is
/// replaced lossily.
pub(super) fn string_pairs(pairs: Vec<(String, Vec<u8>)>) -> Vec<(String, String)> {
    pairs
        .into_iter()
        .map(|(name, value)| {
            let value = String::from_utf8(value)
                .unwrap_or_else(|invalid| String::from_utf8_lossy(invalid.as_bytes()).into_owned());
            (name, value)
        })
        .collect()
}

/// How store calls leave: a stream's are queued for the root context, which is woken at once;
/// the root context's own go out directly, or into the same queue when marked for batching.
#[derive(Clone)]
pub(super) struct StoreCalls {
    pub(super) owner: CallOwner,
    pub(super) batcher: Rc<Batcher<CallOwner>>,
    pub(super) doorbell: Rc<Doorbell>,
}

/// [`Host`] over proxy-wasm hostcalls for the current stream (or the root context).
pub(super) struct WasmHost {
    pub(super) config: Option<Rc<Config>>,
    pub(super) metrics: Rc<MetricIds>,
    /// Whose calls these are, and the batcher they may go through.
    pub(super) calls: StoreCalls,
    /// Envoy's Wasm log level is debug or trace (kept by the root context).
    pub(super) debug: Rc<Cell<bool>>,
}

impl Host for WasmHost {
    fn request_headers(&self) -> Result<Vec<(String, String)>, HostError> {
        hostcalls::get_map_bytes(MapType::HttpRequestHeaders)
            .map(string_pairs)
            .map_err(host_error("get_request_headers"))
    }

    fn request_header_bytes(&self, name: &str) -> Result<Vec<Vec<u8>>, HostError> {
        // The whole map: a single-value lookup gives only the first field line.
        hostcalls::get_map_bytes(MapType::HttpRequestHeaders)
            .map(|pairs| {
                pairs
                    .into_iter()
                    .filter(|(n, _)| n == name)
                    .map(|(_, value)| value)
                    .collect()
            })
            .map_err(host_error("get_request_headers"))
    }

    fn set_request_header(&self, name: &str, value: Option<&str>) -> Result<(), HostError> {
        hostcalls::set_map_value(MapType::HttpRequestHeaders, name, value)
            .map_err(host_error("set_request_header"))
    }

    fn request_body(&self, size: usize) -> Result<Vec<u8>, HostError> {
        hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size)
            .map(Option::unwrap_or_default)
            .map_err(host_error("get_request_body"))
    }

    fn set_response_header(&self, name: &str, value: Option<&str>) -> Result<(), HostError> {
        hostcalls::set_map_value(MapType::HttpResponseHeaders, name, value)
            .map_err(host_error("set_response_header"))
    }

    fn response_headers(&self) -> Result<Vec<(String, String)>, HostError> {
        hostcalls::get_map_bytes(MapType::HttpResponseHeaders)
            .map(string_pairs)
            .map_err(host_error("get_response_headers"))
    }

    fn response_body(&self, size: usize) -> Result<Vec<u8>, HostError> {
        hostcalls::get_buffer(BufferType::HttpResponseBody, 0, size)
            .map(Option::unwrap_or_default)
            .map_err(host_error("get_response_body"))
    }

    fn response_trailers(&self) -> Result<Vec<(String, String)>, HostError> {
        hostcalls::get_map_bytes(MapType::HttpResponseTrailers)
            .map(string_pairs)
            .map_err(host_error("get_response_trailers"))
    }

    fn send_grpc_response(
        &self,
        status: u32,
        message: &str,
        metadata: &[(String, String)],
    ) -> Result<(), HostError> {
        let pairs: Vec<(&str, &[u8])> = metadata.iter().map(|(n, v)| (n.as_str(), v.as_bytes())).collect();
        let status = grpc_status_code(status);
        hostcalls::send_grpc_response(status, Some(message), pairs).map_err(host_error("send_grpc_response"))
    }

    fn clear_route_cache(&self) -> Result<(), HostError> {
        // Envoy's foreign function; Envoy also clears the route cache itself when a filter
        // changes request headers, this makes it explicit.
        hostcalls::call_foreign_function("clear_route_cache", Some(&[]))
            .map(|_| ())
            .map_err(host_error("clear_route_cache"))
    }

    fn dispatch(&self, callout: &Callout<'_>) -> Result<u32, HostError> {
        let calls = &self.calls;
        match calls.owner {
            CallOwner::Stream(_) => {
                let token = calls.batcher.submit(calls.owner.clone(), callout);
                if calls.batcher.ready() {
                    calls.doorbell.ring();
                }
                return Ok(token);
            }
            // The root context flushes the batcher once its background queue is drained.
            CallOwner::Background if callout.may_batch => {
                return Ok(calls.batcher.submit(CallOwner::Background, callout));
            }
            CallOwner::Background => {}
        }
        let Some(config) = self.config.as_ref() else {
            return Err(HostError {
                call: "dispatch_http_call",
                status: "no configuration".to_owned(),
            });
        };
        // The newest token configured for this store and service (a rotation loses no write).
        let token = crate::store::credentials::current(config);
        let mut headers = vec![
            (":method", "POST"),
            (":path", callout.path),
            (":authority", config.store.authority.as_str()),
            ("content-type", "application/json"),
        ];
        if let Some(value) = token.authorization.as_deref() {
            headers.push(("authorization", value));
        }
        hostcalls::dispatch_http_call(
            &config.store.cluster,
            headers,
            Some(callout.body),
            Vec::new(),
            callout.timeout,
        )
        .map_err(host_error("dispatch_http_call"))
    }

    fn callout_reply(&self, body_size: usize) -> CalloutReply {
        let status = hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten()
            .and_then(|v| std::str::from_utf8(&v).ok().and_then(|s| s.parse::<u16>().ok()));
        let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        CalloutReply { status, body }
    }

    fn send_response(&self, status: u16, headers: &[(String, String)], body: &[u8]) -> Result<(), HostError> {
        let pairs: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        hostcalls::send_http_response(u32::from(status), pairs, Some(body))
            .map_err(host_error("send_http_response"))
    }

    fn resume_request(&self) -> Result<(), HostError> {
        hostcalls::resume_http_request().map_err(host_error("resume_http_request"))
    }

    fn resume_response(&self) -> Result<(), HostError> {
        hostcalls::resume_http_response().map_err(host_error("resume_http_response"))
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        hostcalls::get_property(path.to_vec()).ok().flatten()
    }

    fn now(&self) -> Duration {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .unwrap_or_default()
    }

    fn debug_enabled(&self) -> bool {
        self.debug.get()
    }

    fn log(&self, level: Level, message: &str) {
        let level = match level {
            Level::Debug => LogLevel::Debug,
            Level::Warn => LogLevel::Warn,
            Level::Error => LogLevel::Error,
        };
        log(level, message);
    }

    fn count(&self, counter: Counter) {
        if let Some(id) = self.metrics.counters.get(&counter) {
            let _ = hostcalls::increment_metric(*id, 1);
        }
    }

    fn wake_background(&self) {
        // Ring for the root context now (an outcome-unknown should land before a quick retry
        // asks); without a doorbell its tick polls (`tick::POLLING`).
        if let CallOwner::Stream(_) = self.calls.owner {
            self.calls.doorbell.ring();
        }
    }

    fn record_acquire_duration(&self, duration: Duration) {
        if let Some(id) = self.metrics.acquire_duration {
            let _ = hostcalls::record_metric(id, crate::metrics::whole_milliseconds_up(duration));
        }
    }
}
