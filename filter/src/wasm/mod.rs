//! The proxy-wasm edge: the only module that calls the host. Maps Envoy callbacks onto
//! [`RequestFlow`] and implements [`Host`] with the SDK's `hostcalls`.
//!
//! Only the Result-returning `hostcalls` are used (the SDK's trait helpers unwrap), and header
//! values are read as bytes so no header content can make the SDK panic.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType, Status};

use crate::config::Config;
use crate::flow::{RequestFlow, Verdict};
use crate::host::{Callout, CalloutReply, Host, HostError, Level};
use crate::metrics::{Counter, ACQUIRE_DURATION_HISTOGRAM};
use crate::reply::cache::ReplayCache;
use crate::store::background::Background;
use crate::store::batch::{Batcher, Delivery};
use crate::store::routing::{self, CallOwner, Contexts, StreamOwner};
use crate::tick;

mod host;
mod stream;

use host::{log, StoreCalls, WasmHost};
use stream::Stream;

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

/// Wakes the root context as soon as the current callback returns: a shared queue registered
/// under a name of this worker's own (Envoy runs `on_queue_ready` on the registering worker).
/// Streams ring it when they queue a store call the root may send now, or a background call
/// (`store/background.rs`); only the root context can own a callout that must survive the stream that
/// asked for it.
#[derive(Default)]
struct Doorbell {
    queue: Cell<Option<u32>>,
    rung: Cell<bool>,
}

impl Doorbell {
    fn install(&self) -> Result<(), Status> {
        // A fixed name would bind every worker's queue to the last worker that registered it;
        // an attempt id is random (with a fallback should the host refuse randomness).
        let now = hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .unwrap_or_default();
        let name = format!(
            "idempotency-calls-{}",
            crate::request::attempt::unique_name(now, "calls")
        );
        self.queue.set(Some(hostcalls::register_shared_queue(&name)?));
        Ok(())
    }

    fn ring(&self) {
        if self.rung.get() {
            return;
        }
        if let Some(queue) = self.queue.get() {
            // If it fails, the root context's tick sends the call (`tick::IDLE` at worst).
            if hostcalls::enqueue_shared_queue(queue, Some(b"!")).is_ok() {
                self.rung.set(true);
            }
        }
    }

    /// Empty the queue (its entries only ever say "look at the batcher").
    fn answer(&self, queue: u32) {
        for _ in 0..1024 {
            if !matches!(hostcalls::dequeue_shared_queue(queue), Ok(Some(_))) {
                break;
            }
        }
        self.rung.set(false);
    }
}

/// Root context: owns the parsed configuration, hands it to every stream, sends every store
/// call (`store/batch.rs`) and the background calls that must outlive their stream.
pub struct Root {
    context_id: u32,
    config: Option<Rc<Config>>,
    metrics: Rc<MetricIds>,
    background: Rc<Background>,
    cache: Rc<RefCell<ReplayCache>>,
    batcher: Rc<Batcher<CallOwner>>,
    doorbell: Rc<Doorbell>,
    /// Whether Envoy logs Wasm at debug level, read on every tick instead of on every log line
    /// of every request (`/logging` changes are seen within `tick::IDLE`).
    debug: Rc<Cell<bool>>,
    /// The tick period set with the host (zero: none yet).
    tick: Cell<Duration>,
    /// The start-up check of `store_cluster`: not yet sent (`Pending`), or its callout token.
    store_check: Cell<StoreCheck>,
}

/// Where the start-up check of the store route stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StoreCheck {
    Pending,
    Sent(u32),
    Done,
}

fn debug_logging() -> bool {
    hostcalls::get_log_level().is_ok_and(|level| matches!(level, LogLevel::Trace | LogLevel::Debug))
}

impl Root {
    /// The root context `context_id`.
    pub fn new(context_id: u32) -> Root {
        Root {
            context_id,
            config: None,
            metrics: Rc::default(),
            background: Rc::default(),
            cache: Rc::new(RefCell::new(ReplayCache::new(0, 0))),
            batcher: Rc::new(Batcher::new(1, 1)),
            doorbell: Rc::default(),
            debug: Rc::default(),
            tick: Cell::new(Duration::ZERO),
            store_check: Cell::new(StoreCheck::Pending),
        }
    }

    /// The tick period this root needs now (`tick.rs`).
    fn wanted_tick(&self) -> Duration {
        tick::period(self.doorbell.queue.get().is_some(), self.background.queued() > 0)
    }

    /// Set the tick period to the one needed now. Never call it from `on_tick`: Envoy 1.40
    /// leaves the timer disarmed when the period changes inside the tick (there, ring the
    /// doorbell and `on_queue_ready` calls this).
    fn retune_tick(&self) -> Result<(), Status> {
        let wanted = self.wanted_tick();
        if wanted != self.tick.get() {
            hostcalls::set_tick_period(wanted)?;
            self.tick.set(wanted);
        }
        Ok(())
    }

    /// `retune_tick` from an event callback, logging a refusal (the old period stays).
    fn retune_tick_or_log(&self) {
        if let Err(status) = self.retune_tick() {
            log(
                LogLevel::Warn,
                &format!("idempotency: cannot change the tick period: {status:?}"),
            );
        }
    }

    /// The host as the root context itself: its calls are dispatched as they are, except the
    /// background calls marked for batching.
    fn host(&self) -> WasmHost {
        self.host_for(CallOwner::Background)
    }

    /// The host for a stream: its store calls go through the batcher.
    fn stream_host(&self, owner: StreamOwner) -> WasmHost {
        self.host_for(CallOwner::Stream(owner))
    }

    fn host_for(&self, owner: CallOwner) -> WasmHost {
        WasmHost {
            config: self.config.clone(),
            metrics: self.metrics.clone(),
            calls: StoreCalls {
                owner,
                batcher: self.batcher.clone(),
                doorbell: self.doorbell.clone(),
            },
            debug: self.debug.clone(),
        }
    }

    /// Hand batched background calls to the batcher, then send what may leave now.
    fn drain_background_and_flush(&self) {
        if let (true, Some(config)) = (self.background.queued() > 0, self.config.clone()) {
            self.background.drain(&self.host(), &config);
        }
        self.flush();
    }

    /// Send what the batcher may send now, and fail back whatever could not be dispatched.
    fn flush(&self) {
        let failed = self.batcher.flush(&self.host());
        self.deliver(failed);
    }

    /// Hand each reply to whoever waits for it (`store::routing`).
    fn deliver(&self, deliveries: Vec<Delivery<CallOwner>>) {
        if !deliveries.is_empty() {
            routing::deliver(self, &self.background, self.config.as_deref(), deliveries);
        }
    }
}

impl Root {
    /// Send the start-up check of `store_cluster` (see `store_check`); a missing cluster is
    /// known at once.
    fn send_store_check(&self) {
        let Some(config) = self.config.as_ref() else {
            return;
        };
        let headers = vec![
            (":method", "GET"),
            (":path", crate::store::store_check::PROBE_PATH),
            (":authority", config.store.authority.as_str()),
        ];
        match hostcalls::dispatch_http_call(
            &config.store.cluster,
            headers,
            None,
            Vec::new(),
            config.store.timeout,
        ) {
            Ok(token) => self.store_check.set(StoreCheck::Sent(token)),
            Err(status) => {
                log(
                    LogLevel::Error,
                    &crate::store::store_check::dispatch_failed(
                        &config.store.cluster,
                        &format!("{status:?}"),
                    ),
                );
                self.store_check.set(StoreCheck::Done);
            }
        }
    }

    fn on_store_check_reply(&self) {
        self.store_check.set(StoreCheck::Done);
        let Some(config) = self.config.as_ref() else {
            return;
        };
        // As bytes: the SDK's text form panics on a value that is not UTF-8, and this answer may
        // come from anything the cluster leads to.
        let headers = hostcalls::get_map_bytes(MapType::HttpCallResponseHeaders).unwrap_or_default();
        let value = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .and_then(|(_, v)| std::str::from_utf8(v).ok())
        };
        let status = value(":status").and_then(|s| s.parse().ok());
        if let Some(problem) = crate::store::store_check::reply_problem(
            &config.store.cluster,
            status,
            value(idempotency_wire::headers::ANSWERED_BY),
        ) {
            log(LogLevel::Error, &problem);
        }
    }
}

impl Contexts for Root {
    fn root_context_id(&self) -> u32 {
        self.context_id
    }

    fn act_as(&self, context_id: u32) -> bool {
        hostcalls::set_effective_context(context_id).is_ok()
    }

    fn as_root(&self, act: &mut dyn FnMut(&dyn Host)) {
        act(&self.host());
    }

    fn as_stream(&self, owner: StreamOwner, act: &mut dyn FnMut(&dyn Host)) {
        act(&self.stream_host(owner));
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
        if self.store_check.get() == StoreCheck::Sent(token_id) {
            self.on_store_check_reply();
            return;
        }
        let host = self.host();
        let reply = host.callout_reply(body_size);
        if self.batcher.owns(token_id) {
            let deliveries = self.batcher.on_reply(&host, token_id, reply).unwrap_or_default();
            // The slot this reply freed goes first to the calls that queued meanwhile: the next
            // batch is on its way to the store before these replies resume their streams.
            self.drain_background_and_flush();
            self.deliver(deliveries);
        } else if let Some(config) = self.config.clone() {
            self.background.on_reply(&host, &config, token_id, reply);
        }
        // A callout slot is free: what queued meanwhile (or while delivering) leaves now.
        self.drain_background_and_flush();
        self.retune_tick_or_log();
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
                        config.service_name, config.policy.mode, config.store.cluster
                    ),
                );
                self.metrics = Rc::new(MetricIds::define(&config));
                self.cache = Rc::new(RefCell::new(ReplayCache::new(
                    config.replay.cache_max_entries,
                    config.replay.cache_max_bytes,
                )));
                self.batcher = Rc::new(Batcher::new(
                    config.store.batch_max_calls,
                    config.store.max_calls_in_flight,
                ));
                if let Err(status) = self.doorbell.install() {
                    log(
                        LogLevel::Warn,
                        &format!("idempotency: cannot register the call queue ({status:?}); store calls wait for the tick"),
                    );
                }
                self.config = Some(Rc::new(config));
                self.debug.set(debug_logging());
                if let Err(status) = self.retune_tick() {
                    log(
                        LogLevel::Error,
                        &format!("idempotency: cannot start the background tick: {status:?}"),
                    );
                    return false;
                }
                // Only a configuration Envoy keeps may replace the token others present.
                if let Some(config) = &self.config {
                    crate::store::credentials::publish(config);
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
        self.debug.set(debug_logging());
        if self.store_check.get() == StoreCheck::Pending {
            self.send_store_check();
        }
        // Should a ring ever go unanswered, the doorbell must not stay silent: at worst this
        // costs one extra wake-up.
        self.doorbell.rung.set(false);
        self.drain_background_and_flush();
        if self.wanted_tick() != self.tick.get() {
            // Retuned from `on_queue_ready`: never inside the tick itself.
            self.doorbell.ring();
        }
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        self.doorbell.answer(queue_id);
        self.drain_background_and_flush();
        self.retune_tick_or_log();
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Returning None makes the SDK panic, so a stream without configuration gets a pass-through.
        let (background, cache) = (self.background.clone(), self.cache.clone());
        let flow = self
            .config
            .clone()
            .map(|config| Rc::new(RefCell::new(RequestFlow::new(config, background, cache))));
        let host = match &flow {
            Some(flow) => self.stream_host(StreamOwner {
                context_id,
                flow: Rc::downgrade(flow),
            }),
            None => self.host(),
        };
        Some(Box::new(Stream { flow, host }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
