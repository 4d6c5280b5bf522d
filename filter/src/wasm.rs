//! The proxy-wasm edge: the only module that calls the host. Maps Envoy callbacks onto
//! [`RequestFlow`] and implements [`Host`] with the SDK's `hostcalls`.
//!
//! Only the Result-returning `hostcalls` are used (the SDK's trait helpers unwrap), and header
//! values are read as bytes so no header content can make the SDK panic.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType, Status};

use crate::background::Background;
use crate::cache::ReplayCache;
use crate::config::Config;
use crate::flow::{RequestFlow, Verdict};
use crate::host::{Callout, CalloutReply, Host, HostError, Level};
use crate::metrics::{Counter, ACQUIRE_DURATION_HISTOGRAM};

/// Metric ids defined once per VM.
#[derive(Debug, Default)]
struct MetricIds {
    counters: HashMap<Counter, u32>,
    acquire_duration: Option<u32>,
}

impl MetricIds {
    fn define(config: &Config) -> MetricIds {
        let mut ids = MetricIds::default();
        for counter in Counter::ALL {
            if let Ok(id) = hostcalls::define_metric(MetricType::Counter, &config.stat_name(counter.name())) {
                ids.counters.insert(counter, id);
            }
        }
        ids.acquire_duration = hostcalls::define_metric(
            MetricType::Histogram,
            &config.stat_name(ACQUIRE_DURATION_HISTOGRAM),
        )
        .ok();
        ids
    }
}

/// How often the root context dispatches queued background calls. A steady tick: toggling the
/// period from inside `on_tick` left Envoy 1.40's timer disarmed until the next stream event.
/// An idle tick is one cheap VM call.
const BACKGROUND_TICK: Duration = Duration::from_millis(5);

/// Root context: owns the parsed configuration, hands it to every stream, and makes the
/// background calls that must outlive their stream.
pub struct Root {
    config: Option<Rc<Config>>,
    metrics: Rc<MetricIds>,
    background: Rc<Background>,
    cache: Rc<RefCell<ReplayCache>>,
}

impl Default for Root {
    fn default() -> Root {
        Root {
            config: None,
            metrics: Rc::default(),
            background: Rc::default(),
            cache: Rc::new(RefCell::new(ReplayCache::new(0, 0))),
        }
    }
}

impl Root {
    fn host(&self) -> WasmHost {
        WasmHost {
            config: self.config.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let host = self.host();
        if let Some(config) = self.config.clone() {
            let reply = host.callout_reply(body_size);
            self.background.on_reply(&host, &config, token_id, reply);
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => Vec::new(),
            Err(status) => {
                log(
                    LogLevel::Error,
                    &format!("idempotency: cannot read plugin configuration: {status:?}"),
                );
                return false;
            }
        };
        match Config::parse(&bytes) {
            Ok(config) => {
                log(
                    LogLevel::Info,
                    &format!(
                        "idempotency: configured for service {:?} in {:?} mode, store cluster {:?}",
                        config.service_name, config.mode, config.store_cluster
                    ),
                );
                self.metrics = Rc::new(MetricIds::define(&config));
                self.cache = Rc::new(RefCell::new(ReplayCache::new(
                    config.replay_cache_max_entries,
                    config.replay_cache_max_bytes,
                )));
                self.config = Some(Rc::new(config));
                if let Err(status) = hostcalls::set_tick_period(BACKGROUND_TICK) {
                    log(
                        LogLevel::Error,
                        &format!("idempotency: cannot start the background tick: {status:?}"),
                    );
                    return false;
                }
                true
            }
            Err(error) => {
                log(LogLevel::Error, &error.to_string());
                false
            }
        }
    }

    fn on_tick(&mut self) {
        if let (true, Some(config)) = (self.background.queued() > 0, self.config.clone()) {
            self.background.drain(&self.host(), &config);
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Returning None makes the SDK panic, so a stream without configuration gets a pass-through.
        let (background, cache) = (self.background.clone(), self.cache.clone());
        Some(Box::new(Stream {
            flow: self
                .config
                .clone()
                .map(|config| RequestFlow::new(config, background, cache)),
            host: self.host(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One HTTP stream.
struct Stream {
    flow: Option<RequestFlow>,
    host: WasmHost,
}

fn to_action(verdict: Verdict) -> Action {
    match verdict {
        Verdict::Continue => Action::Continue,
        Verdict::Pause => Action::Pause,
    }
}

impl Context for Stream {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        if let Some(flow) = self.flow.as_mut() {
            let reply = self.host.callout_reply(body_size);
            flow.on_callout_reply(&self.host, token_id, reply);
        }
    }

    fn on_done(&mut self) -> bool {
        if let Some(flow) = self.flow.as_mut() {
            flow.on_stream_done(&self.host);
        }
        true
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        match self.flow.as_mut() {
            Some(flow) => to_action(flow.on_request_headers(&self.host, end_of_stream)),
            None => Action::Continue,
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        match self.flow.as_mut() {
            Some(flow) => to_action(flow.on_request_body(&self.host, body_size, end_of_stream)),
            None => Action::Continue,
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        match self.flow.as_mut() {
            Some(flow) => to_action(flow.on_response_headers(&self.host, end_of_stream)),
            None => Action::Continue,
        }
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        match self.flow.as_mut() {
            Some(flow) => to_action(flow.on_request_trailers(&self.host)),
            None => Action::Continue,
        }
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        match self.flow.as_mut() {
            Some(flow) => to_action(flow.on_response_trailers(&self.host)),
            None => Action::Continue,
        }
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        match self.flow.as_mut() {
            Some(flow) => to_action(flow.on_response_body(&self.host, body_size, end_of_stream)),
            None => Action::Continue,
        }
    }
}

fn grpc_status_code(status: u32) -> proxy_wasm::types::GrpcStatusCode {
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

fn log(level: LogLevel, message: &str) {
    // Nothing sensible is left to do if logging itself fails.
    let _ = hostcalls::log(level, message);
}

fn host_error(call: &'static str) -> impl Fn(Status) -> HostError {
    move |status| HostError {
        call,
        status: format!("{status:?}"),
    }
}

fn string_pairs(pairs: Vec<(String, Vec<u8>)>) -> Vec<(String, String)> {
    pairs
        .into_iter()
        .map(|(name, value)| (name, String::from_utf8_lossy(&value).into_owned()))
        .collect()
}

/// [`Host`] over proxy-wasm hostcalls for the current stream.
struct WasmHost {
    config: Option<Rc<Config>>,
    metrics: Rc<MetricIds>,
}

impl Host for WasmHost {
    fn request_headers(&self) -> Result<Vec<(String, String)>, HostError> {
        hostcalls::get_map_bytes(MapType::HttpRequestHeaders)
            .map(string_pairs)
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
        let Some(config) = self.config.as_ref() else {
            return Err(HostError {
                call: "dispatch_http_call",
                status: "no configuration".to_owned(),
            });
        };
        let authorization = config.store_token.as_ref().map(|t| format!("Bearer {t}"));
        let mut headers = vec![
            (":method", "POST"),
            (":path", callout.path),
            (":authority", config.store_authority.as_str()),
            ("content-type", "application/json"),
        ];
        if let Some(value) = authorization.as_deref() {
            headers.push(("authorization", value));
        }
        hostcalls::dispatch_http_call(
            &config.store_cluster,
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
        hostcalls::get_log_level().is_ok_and(|level| matches!(level, LogLevel::Trace | LogLevel::Debug))
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
        // The root context's steady tick picks the call up within BACKGROUND_TICK.
    }

    fn record_acquire_duration(&self, duration: Duration) {
        if let Some(id) = self.metrics.acquire_duration {
            let _ = hostcalls::record_metric(id, u64::try_from(duration.as_millis()).unwrap_or(u64::MAX));
        }
    }
}
