//! Mock host for unit tests: scripted headers and bodies, recorded calls.

use std::cell::RefCell;
use std::time::Duration;

use crate::host::{Callout, CalloutReply, Host, HostError, Level};
use crate::metrics::Counter;

/// What the flow did to the host, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    SetRequestHeader(String, Option<String>),
    Dispatch {
        path: String,
        body: String,
        token: u32,
    },
    SendResponse {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    SendGrpc {
        status: u32,
        message: String,
        metadata: Vec<(String, String)>,
    },
    ClearRouteCache,
    ResumeRequest,
    ResumeResponse,
}

/// A local response the flow sent: status, headers, body.
pub type SentResponse = (u16, Vec<(String, String)>, String);

#[derive(Debug, Default)]
pub struct MockHost {
    pub request_headers: RefCell<Vec<(String, String)>>,
    /// Request headers added as bytes (values that may not be UTF-8): `request_headers` holds
    /// their text (U+FFFD for each bad sequence, as the Wasm host gives it) and
    /// `request_header_bytes` answers with these for their name.
    pub request_header_bytes: RefCell<Vec<(String, Vec<u8>)>>,
    pub request_body: RefCell<Vec<u8>>,
    pub response_headers: RefCell<Vec<(String, String)>>,
    pub response_body: RefCell<Vec<u8>>,
    pub calls: RefCell<Vec<Call>>,
    pub counters: RefCell<Vec<Counter>>,
    pub logs: RefCell<Vec<(Level, String)>>,
    pub fail_dispatch: RefCell<bool>,
    pub background_wakes: RefCell<usize>,
    pub properties: RefCell<std::collections::HashMap<Vec<String>, Vec<u8>>>,
    /// Response trailers the next read returns.
    pub response_trailers: RefCell<Vec<(String, String)>>,
    /// How far the clock has been moved past its start.
    pub clock_advance: RefCell<Duration>,
    /// Timeout of the last dispatched callout.
    pub last_timeout: RefCell<Option<Duration>>,
    /// Whether the last dispatched callout could be batched.
    pub last_may_batch: RefCell<Option<bool>>,
    next_token: RefCell<u32>,
    /// Every call into the host, by method name (each is a VM→Envoy crossing in production).
    pub host_calls: RefCell<std::collections::BTreeMap<&'static str, usize>>,
    /// Debug logging off, as at Envoy's default level.
    pub quiet: RefCell<bool>,
}

impl MockHost {
    pub fn with_request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> MockHost {
        let host = MockHost::default();
        let mut all = vec![
            (":method".to_owned(), method.to_owned()),
            (":path".to_owned(), path.to_owned()),
        ];
        all.extend(headers.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())));
        *host.request_headers.borrow_mut() = all;
        *host.request_body.borrow_mut() = body.to_vec();
        host
    }

    /// Add a request header whose value is `bytes`, which may not be UTF-8.
    pub fn add_request_header_bytes(&self, name: &str, bytes: &[u8]) {
        let text = String::from_utf8_lossy(bytes).into_owned();
        self.request_headers.borrow_mut().push((name.to_owned(), text));
        self.request_header_bytes
            .borrow_mut()
            .push((name.to_owned(), bytes.to_vec()));
    }

    pub fn set_response(&self, status: u16, headers: &[(&str, &str)], body: &[u8]) {
        let mut all = vec![(":status".to_owned(), status.to_string())];
        all.extend(headers.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())));
        *self.response_headers.borrow_mut() = all;
        *self.response_body.borrow_mut() = body.to_vec();
    }

    pub fn set_property(&self, path: &[&str], value: &[u8]) {
        let key: Vec<String> = path.iter().map(|p| (*p).to_owned()).collect();
        self.properties.borrow_mut().insert(key, value.to_vec());
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.borrow().clone()
    }

    pub fn dispatches(&self) -> Vec<(String, serde_json::Value, u32)> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Dispatch { path, body, token } => Some((
                    path,
                    serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
                    token,
                )),
                _ => None,
            })
            .collect()
    }

    pub fn last_token(&self) -> u32 {
        *self.next_token.borrow()
    }

    pub fn sent_response(&self) -> Option<SentResponse> {
        self.calls().into_iter().find_map(|c| match c {
            Call::SendResponse {
                status,
                headers,
                body,
            } => Some((status, headers, body)),
            _ => None,
        })
    }

    fn tally(&self, call: &'static str) {
        *self.host_calls.borrow_mut().entry(call).or_default() += 1;
    }

    /// Log at Envoy's default level (info): debug lines are not built.
    pub fn quiet(&self) {
        *self.quiet.borrow_mut() = true;
    }

    /// Host calls made so far, all methods together.
    pub fn host_call_count(&self) -> usize {
        self.host_calls.borrow().values().sum()
    }

    pub fn counted(&self, counter: Counter) -> usize {
        self.counters.borrow().iter().filter(|c| **c == counter).count()
    }
}

impl Host for MockHost {
    fn request_headers(&self) -> Result<Vec<(String, String)>, HostError> {
        self.tally("request_headers");
        Ok(self.request_headers.borrow().clone())
    }

    fn request_header_bytes(&self, name: &str) -> Result<Vec<Vec<u8>>, HostError> {
        self.tally("request_header_bytes");
        let added_as_bytes: Vec<Vec<u8>> = self
            .request_header_bytes
            .borrow()
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect();
        if !added_as_bytes.is_empty() {
            return Ok(added_as_bytes);
        }
        Ok(self
            .request_headers
            .borrow()
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone().into_bytes())
            .collect())
    }

    fn set_request_header(&self, name: &str, value: Option<&str>) -> Result<(), HostError> {
        self.tally("set_request_header");
        self.calls
            .borrow_mut()
            .push(Call::SetRequestHeader(name.to_owned(), value.map(str::to_owned)));
        let mut headers = self.request_headers.borrow_mut();
        headers.retain(|(n, _)| n != name);
        if let Some(v) = value {
            headers.push((name.to_owned(), v.to_owned()));
        }
        Ok(())
    }

    fn request_body(&self, size: usize) -> Result<Vec<u8>, HostError> {
        self.tally("request_body");
        Ok(self.request_body.borrow().iter().take(size).copied().collect())
    }

    fn set_response_header(&self, name: &str, value: Option<&str>) -> Result<(), HostError> {
        self.tally("set_response_header");
        let mut headers = self.response_headers.borrow_mut();
        headers.retain(|(n, _)| n != name);
        if let Some(v) = value {
            headers.push((name.to_owned(), v.to_owned()));
        }
        Ok(())
    }

    fn response_headers(&self) -> Result<Vec<(String, String)>, HostError> {
        self.tally("response_headers");
        Ok(self.response_headers.borrow().clone())
    }

    fn response_body(&self, size: usize) -> Result<Vec<u8>, HostError> {
        self.tally("response_body");
        Ok(self.response_body.borrow().iter().take(size).copied().collect())
    }

    fn response_trailers(&self) -> Result<Vec<(String, String)>, HostError> {
        self.tally("response_trailers");
        Ok(self.response_trailers.borrow().clone())
    }

    fn send_grpc_response(
        &self,
        status: u32,
        message: &str,
        metadata: &[(String, String)],
    ) -> Result<(), HostError> {
        self.tally("send_grpc_response");
        self.calls.borrow_mut().push(Call::SendGrpc {
            status,
            message: message.to_owned(),
            metadata: metadata.to_vec(),
        });
        Ok(())
    }

    fn clear_route_cache(&self) -> Result<(), HostError> {
        self.tally("clear_route_cache");
        self.calls.borrow_mut().push(Call::ClearRouteCache);
        Ok(())
    }

    fn dispatch(&self, callout: &Callout<'_>) -> Result<u32, HostError> {
        self.tally("dispatch");
        if *self.fail_dispatch.borrow() {
            return Err(HostError {
                call: "dispatch_http_call",
                status: "BadArgument".to_owned(),
            });
        }
        let token = {
            let mut next = self.next_token.borrow_mut();
            *next += 1;
            *next
        };
        *self.last_timeout.borrow_mut() = Some(callout.timeout);
        *self.last_may_batch.borrow_mut() = Some(callout.may_batch);
        self.calls.borrow_mut().push(Call::Dispatch {
            path: callout.path.to_owned(),
            body: String::from_utf8_lossy(callout.body).into_owned(),
            token,
        });
        Ok(token)
    }

    fn callout_reply(&self, _body_size: usize) -> CalloutReply {
        self.tally("callout_reply");
        CalloutReply::default()
    }

    fn send_response(&self, status: u16, headers: &[(String, String)], body: &[u8]) -> Result<(), HostError> {
        self.tally("send_response");
        self.calls.borrow_mut().push(Call::SendResponse {
            status,
            headers: headers.to_vec(),
            body: String::from_utf8_lossy(body).into_owned(),
        });
        Ok(())
    }

    fn resume_request(&self) -> Result<(), HostError> {
        self.tally("resume_request");
        self.calls.borrow_mut().push(Call::ResumeRequest);
        Ok(())
    }

    fn resume_response(&self) -> Result<(), HostError> {
        self.tally("resume_response");
        self.calls.borrow_mut().push(Call::ResumeResponse);
        Ok(())
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.tally("property");
        let key: Vec<String> = path.iter().map(|p| (*p).to_owned()).collect();
        self.properties.borrow().get(&key).cloned()
    }

    fn now(&self) -> Duration {
        self.tally("now");
        Duration::from_secs(1_700_000_000).saturating_add(*self.clock_advance.borrow())
    }

    fn debug_enabled(&self) -> bool {
        // Not a host call in production (the root context keeps the level).
        !*self.quiet.borrow() // tests see every line unless they ask for quiet
    }

    fn log(&self, level: Level, message: &str) {
        self.tally("log");
        self.logs.borrow_mut().push((level, message.to_owned()));
    }

    fn count(&self, counter: Counter) {
        self.tally("count");
        self.counters.borrow_mut().push(counter);
    }

    fn record_acquire_duration(&self, _duration: Duration) {
        self.tally("record_acquire_duration");
    }

    fn wake_background(&self) {
        // Not a host call in production.
        *self.background_wakes.borrow_mut() += 1;
    }
}

/// The value in `option`, asserting there is one: the tests' `unwrap` without a panic path in
/// the filter's source (the crate denies `unwrap`/`expect`/`panic`).
#[track_caller]
pub fn present<T: Default>(option: Option<T>) -> T {
    present_because(option, "expected a value, got None")
}

/// [`present`] with the message a failure shows.
#[track_caller]
pub fn present_because<T: Default>(option: Option<T>, missing: &str) -> T {
    assert!(option.is_some(), "{missing}");
    option.unwrap_or_default()
}

/// What `result`'s error says, asserting it is an `Err` (shows the value otherwise).
#[track_caller]
pub fn error_text<T: std::fmt::Debug, E: std::fmt::Display>(result: Result<T, E>) -> String {
    assert!(
        result.is_err(),
        "expected an error, got {:?}",
        result.as_ref().ok()
    );
    result.err().map(|e| e.to_string()).unwrap_or_default()
}

/// The value in `result`, asserting it is `Ok` (shows the error otherwise).
#[track_caller]
pub fn succeeded<T: Default, E: std::fmt::Debug>(result: Result<T, E>) -> T {
    assert!(result.is_ok(), "expected Ok, got {:?}", result.as_ref().err());
    result.unwrap_or_default()
}
