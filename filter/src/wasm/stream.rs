//! One HTTP stream's context: Envoy's callbacks mapped onto its [`RequestFlow`].

#[allow(clippy::wildcard_imports)] // the edge's types and imports
use super::*;

/// One HTTP stream.
pub(super) struct Stream {
    pub(super) flow: Option<Rc<RefCell<RequestFlow>>>,
    pub(super) host: WasmHost,
}

impl Stream {
    /// Run `callback` on the flow; pass-through when there is none (no configuration) or when it
    /// is busy (cannot happen: Envoy defers the effects of a callback until it has returned).
    fn with_flow(&self, callback: impl FnOnce(&mut RequestFlow, &WasmHost) -> Verdict) -> Action {
        match self.flow.as_ref().map(|flow| flow.try_borrow_mut()) {
            Some(Ok(mut flow)) => to_action(callback(&mut flow, &self.host)),
            _ => Action::Continue,
        }
    }
}

pub(super) fn to_action(verdict: Verdict) -> Action {
    match verdict {
        Verdict::Continue => Action::Continue,
        Verdict::Pause => Action::Pause,
    }
}

/// Streams make no callouts of their own (the root context sends them, see `store/batch.rs`).
impl Context for Stream {
    fn on_done(&mut self) -> bool {
        if let Some(Ok(mut flow)) = self.flow.as_ref().map(|flow| flow.try_borrow_mut()) {
            flow.on_stream_done(&self.host);
        }
        true
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.with_flow(|flow, host| flow.on_request_headers(host, end_of_stream))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.with_flow(|flow, host| flow.on_request_body(host, body_size, end_of_stream))
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.with_flow(|flow, host| flow.on_response_headers(host, end_of_stream))
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        self.with_flow(|flow, host| flow.on_request_trailers(host))
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        self.with_flow(|flow, host| flow.on_response_trailers(host))
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.with_flow(|flow, host| flow.on_response_body(host, body_size, end_of_stream))
    }
}
