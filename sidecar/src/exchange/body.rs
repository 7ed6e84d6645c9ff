//! Bodies as they stream through the sidecar:
//!
//! - [`ToUpstream`]: the agent's request body on its way out. Scanned for
//!   placeholders as it streams; placeholders of bindings allowed on the
//!   body are swapped, any other fails the body before a byte of it
//!   leaves (so the upstream sees a cut-off request it will not act on),
//!   and the handler answers 403;
//! - [`ToAgent`]: the upstream's response on its way back. Checked for
//!   echoes of any secret as it streams, holding back only bytes that could
//!   begin one; a match fails the body (HTTP/1.1: the connection closes;
//!   HTTP/2: the stream is reset) and is audited.
//!
//! Both fail a body that is silent longer than the idle timeout, and check
//! trailers too.

use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::echo::{EchoDetector, EchoFound, EchoStream};
use crate::engine::{Lookup, Snapshot};
use crate::substitute::{BindingSet, BodyReplacer, NoSecrets, PlaceholderSet};
use crate::upstream::BoxError;

/// A body error that names what happened (never a value).
#[derive(Debug, Clone)]
pub struct BodyError(pub String);

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BodyError {}

/// What happened to a request body, read by the handler after the fact.
#[derive(Debug, Default)]
pub struct RequestBodyOutcome {
    /// Set when a placeholder was refused: `(binding, reason code)`.
    blocked: OnceLock<(usize, &'static str)>,
    /// The bindings swapped into the body.
    swapped: Mutex<BindingSet>,
    /// Notified once the body ended (or failed): the upstream's time to
    /// answer counts from then.
    ended: tokio::sync::Notify,
    /// Set with `ended`, for those who look rather than wait.
    is_ended: std::sync::atomic::AtomicBool,
    /// When the upstream side last asked for more of the body.
    last_polled: Mutex<Option<Instant>>,
}

impl RequestBodyOutcome {
    pub fn blocked(&self) -> Option<(usize, &'static str)> {
        self.blocked.get().copied()
    }

    pub fn swapped(&self) -> BindingSet {
        self.swapped
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Resolves once the body has ended.
    pub async fn ended(&self) {
        self.ended.notified().await;
    }

    /// Resolves once the upstream side has not asked for more of the body
    /// for `idle` (counted from `since` if it never asked): an upstream that
    /// stops reading an upload stops polling the body, so the body's own
    /// idle timer never runs.
    /// Never resolves once the body has ended (the response timeout runs).
    pub async fn unread_for(&self, idle: Duration, since: Instant) {
        loop {
            if self.is_ended.load(std::sync::atomic::Ordering::Acquire) {
                return std::future::pending().await;
            }
            let last = self
                .last_polled
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .unwrap_or(since);
            let quiet = last.elapsed();
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet).await;
        }
    }

    fn polled(&self) {
        *self
            .last_polled
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
    }

    fn end(&self) {
        self.is_ended
            .store(true, std::sync::atomic::Ordering::Release);
        // notify_one keeps a permit for a waiter that comes later.
        self.ended.notify_one();
    }
}

/// The code a refused placeholder is reported with when its binding was
/// allowed on the body but its value stopped being usable mid-body.
pub const SECRET_UNAVAILABLE_MID_BODY: &str = "secret_unavailable_mid_body";

enum Scan {
    /// Forwarded as it is (no placeholder can be in it).
    Pass,
    Swap(BodyReplacer<Arc<PlaceholderSet>, Lookup<Arc<Snapshot>>>),
    Detect(BodyReplacer<Arc<PlaceholderSet>, NoSecrets>),
}

impl Scan {
    fn feed(&mut self, chunk: Bytes) -> Result<Bytes, crate::substitute::SubstituteError> {
        match self {
            Self::Pass => Ok(chunk),
            Self::Swap(r) => r.feed(chunk),
            Self::Detect(r) => r.feed(chunk),
        }
    }

    fn finish(&mut self) -> Result<Bytes, crate::substitute::SubstituteError> {
        match self {
            Self::Pass => Ok(Bytes::new()),
            Self::Swap(r) => r.finish(),
            Self::Detect(r) => r.finish(),
        }
    }

    fn seen(&self) -> Option<&BindingSet> {
        match self {
            Self::Swap(r) => Some(r.seen()),
            Self::Pass | Self::Detect(_) => None,
        }
    }

    /// Whether it may change the length (only a swap does).
    fn changes_length(&self) -> bool {
        matches!(self, Self::Swap(_))
    }
}

/// A silence timer, made only once a body actually waits.
struct Idle {
    after: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Idle {
    fn new(after: Duration) -> Self {
        Self { after, sleep: None }
    }

    fn reset(&mut self) {
        if let Some(sleep) = self.sleep.as_mut() {
            sleep.as_mut().reset(Instant::now() + self.after);
        }
    }

    /// Polled when the body is pending: `true` once the silence is too long.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let after = self.after;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(after)));
        sleep.as_mut().poll(cx).is_ready()
    }
}

/// The agent's request body on its way to the upstream: passed, scanned,
/// or scanned and swapped.
pub struct ToUpstream<B> {
    inner: B,
    scan: Scan,
    set: Arc<PlaceholderSet>,
    /// The bindings allowed on this body (to tell a stale value from an
    /// exfiltration attempt).
    allowed: BindingSet,
    outcome: Arc<RequestBodyOutcome>,
    idle: Idle,
    /// A frame to send before polling `inner` again (trailers after the
    /// held-back bytes, or the held-back bytes at the end).
    pending: Option<Frame<Bytes>>,
    done: bool,
}

impl<B: Body> ToUpstream<B> {
    /// Forwards the body unchanged (no placeholder can be in it).
    pub fn passing(inner: B, outcome: Arc<RequestBodyOutcome>, idle: Duration) -> Self {
        Self::new(
            inner,
            Scan::Pass,
            Arc::new(PlaceholderSet::empty()),
            BindingSet::new(),
            outcome,
            idle,
        )
    }

    /// Swaps placeholders of the bindings `lookup` allows; refuses others.
    pub fn swapping(
        inner: B,
        set: Arc<PlaceholderSet>,
        lookup: Lookup<Arc<Snapshot>>,
        outcome: Arc<RequestBodyOutcome>,
        idle: Duration,
    ) -> Self {
        let allowed = lookup.allowed.clone();
        Self::new(
            inner,
            Scan::Swap(BodyReplacer::replacing(set.clone(), lookup)),
            set,
            allowed,
            outcome,
            idle,
        )
    }

    /// Passes the body through unchanged; refuses any placeholder.
    pub fn detecting(
        inner: B,
        set: Arc<PlaceholderSet>,
        outcome: Arc<RequestBodyOutcome>,
        idle: Duration,
    ) -> Self {
        Self::new(
            inner,
            Scan::Detect(BodyReplacer::detecting(set.clone())),
            set,
            BindingSet::new(),
            outcome,
            idle,
        )
    }

    fn new(
        inner: B,
        scan: Scan,
        set: Arc<PlaceholderSet>,
        allowed: BindingSet,
        outcome: Arc<RequestBodyOutcome>,
        idle: Duration,
    ) -> Self {
        let done = inner.is_end_stream();
        if done {
            outcome.end();
        }
        Self {
            inner,
            scan,
            set,
            allowed,
            outcome,
            idle: Idle::new(idle),
            pending: None,
            done,
        }
    }
}

impl<B> ToUpstream<B> {
    fn refuse(&mut self, binding: usize, reason: &'static str) -> BoxError {
        let code = if self.allowed.contains(binding) {
            SECRET_UNAVAILABLE_MID_BODY
        } else {
            reason
        };
        let _ = self.outcome.blocked.set((binding, code));
        self.stop();
        Box::new(BodyError(format!(
            "the request body carries a placeholder that may not be sent here ({code})"
        )))
    }

    fn stop(&mut self) {
        self.done = true;
        self.pending = None;
        self.outcome.end();
    }

    fn record_swapped(&self) {
        if let Some(seen) = self.scan.seen()
            && !seen.is_empty()
        {
            self.outcome
                .swapped
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .union_with(seen);
        }
    }

    /// The end of the data (at the end of the body, or before trailers):
    /// what was held back is released, or the body is refused.
    fn finish(&mut self) -> Result<Option<Frame<Bytes>>, BoxError> {
        match self.scan.finish() {
            Ok(rest) => {
                self.record_swapped();
                Ok((!rest.is_empty()).then(|| Frame::data(rest)))
            }
            Err(e) => Err(self.refuse(e.binding(), e.reason())),
        }
    }

    fn check_trailers(&mut self, trailers: &HeaderMap) -> Result<(), BoxError> {
        for (name, value) in trailers {
            let mut found = self.set.find(value.as_bytes());
            found.union_with(&self.set.find(name.as_str().as_bytes()));
            if let Some(b) = found.iter().next() {
                return Err(self.refuse(b, "placeholder_in_trailer"));
            }
        }
        Ok(())
    }
}

impl<B> Drop for ToUpstream<B> {
    fn drop(&mut self) {
        // Whoever waits for the end must not wait for a body nobody reads.
        self.outcome.end();
    }
}

impl<B> Body for ToUpstream<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        this.outcome.polled();
        loop {
            if let Some(frame) = this.pending.take() {
                return Poll::Ready(Some(Ok(frame)));
            }
            if this.done {
                return Poll::Ready(None);
            }
            let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => {
                    if this.idle.expired(cx) {
                        this.stop();
                        return Poll::Ready(Some(Err(Box::new(BodyError(
                            "the request body was silent longer than the idle timeout".into(),
                        )))));
                    }
                    return Poll::Pending;
                }
                Poll::Ready(None) => {
                    let rest = this.finish();
                    this.stop();
                    match rest {
                        Ok(rest) => {
                            this.pending = rest;
                            continue;
                        }
                        Err(e) => return Poll::Ready(Some(Err(e))),
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    this.stop();
                    return Poll::Ready(Some(Err(e.into())));
                }
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            this.idle.reset();
            match frame.into_data() {
                Ok(data) => match this.scan.feed(data) {
                    Ok(out) if out.is_empty() => {}
                    Ok(out) => {
                        this.record_swapped();
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                    Err(e) => {
                        return Poll::Ready(Some(Err(this.refuse(e.binding(), e.reason()))));
                    }
                },
                Err(frame) => {
                    let rest = match this.finish() {
                        Ok(rest) => rest,
                        Err(e) => return Poll::Ready(Some(Err(e))),
                    };
                    if let Some(trailers) = frame.trailers_ref()
                        && let Err(e) = this.check_trailers(trailers)
                    {
                        return Poll::Ready(Some(Err(e)));
                    }
                    // Held-back bytes go before the trailers.
                    match rest {
                        Some(rest) => {
                            this.pending = Some(frame);
                            return Poll::Ready(Some(Ok(rest)));
                        }
                        None => return Poll::Ready(Some(Ok(frame))),
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.pending.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        if self.scan.changes_length() {
            // A swap may change the length; never promise one.
            SizeHint::default()
        } else {
            // Unchanged bytes: the agent's length stays true.
            self.inner.size_hint()
        }
    }
}

/// What [`ToAgent`] reports when its body ends or fails.
pub trait OnEnd: Send + 'static {
    /// The body was delivered whole.
    fn complete(self: Box<Self>);
    /// An echo was caught and the response aborted.
    fn echo(self: Box<Self>, found: EchoFound);
    /// The upstream or the agent failed, or the body was dropped early.
    fn broken(self: Box<Self>, why: &str);
}

/// The upstream's response body, checked for echoes on its way to the
/// agent. Bytes are never changed, only held back or cut off, so the
/// upstream's length stays true.
pub struct ToAgent<B: Body> {
    inner: B,
    echo: Option<EchoStream<Arc<EchoDetector>>>,
    on_end: Option<Box<dyn OnEnd>>,
    idle: Idle,
    pending: Option<Frame<Bytes>>,
    done: bool,
}

impl<B: Body> ToAgent<B> {
    /// `detector`: `None` (or an empty one) when no echo can occur here.
    pub fn new(
        inner: B,
        detector: Option<Arc<EchoDetector>>,
        on_end: Box<dyn OnEnd>,
        idle: Duration,
    ) -> Self {
        Self {
            inner,
            echo: detector.filter(|d| !d.is_empty()).map(EchoStream::new),
            on_end: Some(on_end),
            idle: Idle::new(idle),
            pending: None,
            done: false,
        }
    }

    fn echoed(&mut self, found: EchoFound) -> BoxError {
        self.done = true;
        self.pending = None;
        if let Some(end) = self.on_end.take() {
            end.echo(found);
        }
        Box::new(BodyError(
            "the response was aborted: it carried a secret back (credbroker echo protection)"
                .into(),
        ))
    }

    fn broken(&mut self, why: &str) {
        self.done = true;
        if let Some(end) = self.on_end.take() {
            end.broken(why);
        }
    }

    /// The end of the data: releases what was held back, or finds an echo.
    fn finish(&mut self) -> Result<Option<Frame<Bytes>>, BoxError> {
        match self.echo.as_mut().map(EchoStream::finish) {
            None => Ok(None),
            Some(Ok(rest)) => Ok((!rest.is_empty()).then(|| Frame::data(rest))),
            Some(Err(found)) => Err(self.echoed(found)),
        }
    }
}

impl<B: Body> Drop for ToAgent<B> {
    fn drop(&mut self) {
        let Some(end) = self.on_end.take() else {
            return;
        };
        // hyper drops a body without polling it to the end once it has
        // written what it needs (a Content-Length reached, HEAD, 204, 304,
        // 101): that is a complete answer, not an agent going away.
        let held = self.echo.as_ref().is_some_and(|e| e.held_back() > 0);
        if (self.done || self.inner.is_end_stream()) && self.pending.is_none() && !held {
            end.complete();
        } else {
            end.broken("the response was not delivered whole (the agent went away)");
        }
    }
}

impl<B> Body for ToAgent<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if let Some(frame) = this.pending.take() {
                return Poll::Ready(Some(Ok(frame)));
            }
            if this.done {
                if let Some(end) = this.on_end.take() {
                    end.complete();
                }
                return Poll::Ready(None);
            }
            let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => {
                    if this.idle.expired(cx) {
                        let why = "the upstream's response was silent longer than the idle timeout";
                        this.broken(why);
                        return Poll::Ready(Some(Err(Box::new(BodyError(why.into())))));
                    }
                    return Poll::Pending;
                }
                Poll::Ready(None) => {
                    match this.finish() {
                        Ok(rest) => this.pending = rest,
                        Err(e) => return Poll::Ready(Some(Err(e))),
                    }
                    this.done = true;
                    continue;
                }
                Poll::Ready(Some(Err(e))) => {
                    let e: BoxError = e.into();
                    // Never the error's text: it can carry what the
                    // upstream sent (an HTTP/2 GOAWAY's debug data).
                    drop(e);
                    this.broken("the upstream's response broke off");
                    return Poll::Ready(Some(Err(Box::new(BodyError(
                        "the upstream's response broke off".into(),
                    )))));
                }
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            this.idle.reset();
            match frame.into_data() {
                Ok(data) => match this.echo.as_mut() {
                    None => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Some(echo) => match echo.feed(data) {
                        Ok(out) if out.is_empty() => {}
                        Ok(out) => return Poll::Ready(Some(Ok(Frame::data(out)))),
                        Err(found) => return Poll::Ready(Some(Err(this.echoed(found)))),
                    },
                },
                Err(frame) => {
                    let rest = match this.finish() {
                        Ok(rest) => rest,
                        Err(e) => return Poll::Ready(Some(Err(e))),
                    };
                    if let (Some(trailers), Some(echo)) = (frame.trailers_ref(), &this.echo)
                        && let Err(found) = check_headers(echo.detector(), trailers)
                    {
                        return Poll::Ready(Some(Err(this.echoed(found))));
                    }
                    match rest {
                        Some(rest) => {
                            this.pending = Some(frame);
                            return Poll::Ready(Some(Ok(rest)));
                        }
                        None => return Poll::Ready(Some(Ok(frame))),
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_none()
            && (self.done
                || (self.inner.is_end_stream()
                    && self.echo.as_ref().is_none_or(|e| e.held_back() == 0)))
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Checks header names and values for an echo.
pub fn check_headers(detector: &EchoDetector, headers: &HeaderMap) -> Result<(), EchoFound> {
    if detector.is_empty() {
        return Ok(());
    }
    for (name, value) in headers {
        detector.check(value.as_bytes())?;
        detector.check(name.as_str().as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_upload_nobody_reads_times_out_and_an_ended_one_never_does() {
        let idle = Duration::from_secs(10);
        let outcome = RequestBodyOutcome::default();
        let start = Instant::now();
        outcome.unread_for(idle, start).await;
        assert_eq!(start.elapsed(), idle);

        // Read a little later: the silence counts from the last read.
        let outcome = RequestBodyOutcome::default();
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(4)).await;
        outcome.polled();
        outcome.unread_for(idle, start).await;
        assert_eq!(start.elapsed(), Duration::from_secs(14));

        let outcome = RequestBodyOutcome::default();
        outcome.end();
        let waited =
            tokio::time::timeout(idle * 10, outcome.unread_for(idle, Instant::now())).await;
        assert!(waited.is_err(), "an ended body is not an unread one");
    }
}
