//! The one error type of a stack and its OpenAI-style JSON rendering.
//!
//! Layers return `BoxError`; the typed cause is a [`GatewayError`] somewhere in its source chain.
//! The [`rescue`](crate::rescue) layer finds it and renders
//! `{"error": {"message", "type", "param", "code"}}` with the matching status.

use std::{error::Error as StdError, fmt, time::Duration};

use http::{HeaderValue, Response, StatusCode, header};
use serde_json::json;

use crate::{
    body::{GatewayBody, json_response},
    ext::RouteKind,
};

/// The boxed error used inside a stack.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// The typed causes a stack can fail with. Messages never contain secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayError {
    /// The request is malformed; the message names the field or segment.
    BadRequest(String),
    /// The request body is larger than the configured limit (bytes).
    PayloadTooLarge {
        /// The limit in bytes, where the failing layer knows it.
        limit: Option<usize>,
    },
    /// The request body has a `Content-Encoding` the gateway does not decode.
    UnsupportedMediaType(String),
    /// Authentication failed.
    Unauthorized(String),
    /// The request is authenticated but not allowed (e.g. a base URL outside the allowlist).
    Forbidden(String),
    /// The named thing (e.g. a project) does not exist.
    NotFound(String),
    /// The route exists but does not take this method.
    MethodNotAllowed {
        /// The value of the `Allow` header.
        allow: &'static str,
    },
    /// No model has a context window large enough for the request.
    ContextLengthExceeded {
        /// The estimated tokens of the request (input plus requested output).
        estimate: u64,
        /// The largest context window available.
        max: u64,
        /// The model the client asked for.
        model: String,
    },
    /// Every model of the fallback chain is out of budget.
    RateLimited {
        /// When the soonest model has budget again.
        retry_after: Option<Duration>,
        /// The models tried, in order.
        tried: Vec<String>,
    },
    /// An account's own limits (a gateway key's `limits`) are spent, whatever the model.
    AccountRateLimited {
        /// The account's name (never its key).
        account: String,
        /// When it has budget again.
        retry_after: Option<Duration>,
    },
    /// The upstream could not be reached or failed at the transport level.
    UpstreamUnavailable(String),
    /// The upstream did not answer in time (the timeout, where known).
    UpstreamTimeout(Option<Duration>),
    /// A service the gateway needs (e.g. an external authentication service) cannot answer
    /// now; the request is refused rather than let through.
    ServiceUnavailable(String),
    /// A layer that needs a request extension did not find it (a stack assembled wrongly).
    MissingContext(&'static str),
    /// Anything else; the message is safe to show.
    Internal(String),
}

// === impl GatewayError ===

impl GatewayError {
    /// A `BadRequest` with the given message.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::BadRequest(message.into())
    }

    /// The HTTP status the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) | Self::ContextLengthExceeded { .. } => StatusCode::BAD_REQUEST,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::RateLimited { .. } | Self::AccountRateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::UpstreamUnavailable(_) => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::ServiceUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::MissingContext(_) | Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OpenAI error `type`.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::Unauthorized(_) => "authentication_error",
            Self::Forbidden(_) => "permission_error",
            Self::RateLimited { .. } | Self::AccountRateLimited { .. } => "rate_limit_error",
            Self::UpstreamUnavailable(_) | Self::UpstreamTimeout(_) => "upstream_error",
            Self::ServiceUnavailable(_) | Self::MissingContext(_) | Self::Internal(_) => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The OpenAI error `code`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "invalid_request",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::Unauthorized(_) => "invalid_api_key",
            Self::Forbidden(_) => "forbidden",
            Self::NotFound(_) => "not_found",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::ContextLengthExceeded { .. } => "context_length_exceeded",
            Self::RateLimited { .. } | Self::AccountRateLimited { .. } => "rate_limit_exceeded",
            Self::UpstreamUnavailable(_) => "upstream_unavailable",
            Self::UpstreamTimeout(_) => "upstream_timeout",
            Self::ServiceUnavailable(_) => "service_unavailable",
            Self::MissingContext(_) | Self::Internal(_) => "internal_error",
        }
    }

    /// The OpenAI-style JSON response for this error, with `Allow` or `Retry-After` where due.
    pub fn to_response(&self) -> Response<GatewayBody> {
        let body = json!({"error": {
            "message": self.to_string(),
            "type": self.error_type(),
            "param": null,
            "code": self.code(),
        }});
        self.with_headers(json_response(self.status(), &body))
    }

    /// The `{"detail": "…"}` response for this error, the shape of the traces, logs and status
    /// routes (see [`RouteKind::answers_detail`]), with the same status and headers. A 405 says
    /// `Method Not Allowed`, as the original gateway's framework did.
    pub fn to_detail_response(&self) -> Response<GatewayBody> {
        let detail = match self {
            Self::MethodNotAllowed { .. } => "Method Not Allowed".to_owned(),
            _ => self.to_string(),
        };
        self.with_headers(json_response(self.status(), &json!({ "detail": detail })))
    }

    /// `response` with the `Allow` or `Retry-After` header this error calls for.
    fn with_headers(&self, mut response: Response<GatewayBody>) -> Response<GatewayBody> {
        match self {
            Self::MethodNotAllowed { allow } => {
                response.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            Self::RateLimited { retry_after: Some(after), .. }
            | Self::AccountRateLimited { retry_after: Some(after), .. } => {
                // Round up: a client that waits the advertised time must find budget.
                let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            }
            _ => {}
        }
        response
    }

    /// Finds a `GatewayError` in the source chain of `error`.
    pub fn find<'a>(error: &'a (dyn StdError + 'static)) -> Option<&'a GatewayError> {
        find_cause(error)
    }
}

/// The first `T` in the source chain of `error`.
fn find_cause<'a, T: StdError + 'static>(error: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut cause: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(err) = cause {
        if let Some(found) = err.downcast_ref::<T>() {
            return Some(found);
        }
        cause = err.source();
    }
    None
}

// === RouteRefusal ===

/// A [`GatewayError`] refusing a request on a gateway route, kept with the route's kind so
/// that it renders in the route's shape ([`RouteRefusal::to_response`]). Its source is the
/// error, so [`GatewayError::find`] sees through it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRefusal {
    /// The route the request was refused on.
    pub route: RouteKind,
    /// Why.
    pub error: GatewayError,
}

impl RouteRefusal {
    /// `{"detail": "…"}` on the traces, logs and status routes, the OpenAI error elsewhere.
    pub fn to_response(&self) -> Response<GatewayBody> {
        match self.route.answers_detail() {
            true => self.error.to_detail_response(),
            false => self.error.to_response(),
        }
    }

    /// Finds a `RouteRefusal` in the source chain of `error`.
    pub fn find<'a>(error: &'a (dyn StdError + 'static)) -> Option<&'a RouteRefusal> {
        find_cause(error)
    }
}

impl fmt::Display for RouteRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

impl StdError for RouteRefusal {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&self.error)
    }
}

impl fmt::Display for GatewayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadRequest(m)
            | Self::UnsupportedMediaType(m)
            | Self::Unauthorized(m)
            | Self::Forbidden(m)
            | Self::NotFound(m)
            | Self::ServiceUnavailable(m)
            | Self::Internal(m) => f.write_str(m),
            Self::PayloadTooLarge { limit: Some(limit) } => {
                write!(f, "Request body is larger than the limit of {limit} bytes")
            }
            Self::PayloadTooLarge { limit: None } => f.write_str("Request body is larger than the configured limit"),
            Self::MethodNotAllowed { allow } => {
                write!(f, "Method not allowed on this route; allowed: {allow}")
            }
            Self::ContextLengthExceeded { estimate, max, model } => write!(
                f,
                "The request needs about {estimate} tokens, more than the context window of \
                 '{model}' and of every model that could take it (the largest available holds {max})"
            ),
            Self::RateLimited { retry_after, tried } => {
                write!(f, "All models are rate limited; tried: {}", tried.join(", "))?;
                if let Some(after) = retry_after {
                    write!(f, "; retry after {:.1} s", after.as_secs_f64())?;
                }
                Ok(())
            }
            Self::AccountRateLimited { account, retry_after } => {
                write!(f, "The rate limit of API key '{account}' is reached")?;
                if let Some(after) = retry_after {
                    write!(f, "; retry after {:.1} s", after.as_secs_f64())?;
                }
                Ok(())
            }
            Self::UpstreamUnavailable(m) => write!(f, "Upstream unavailable: {m}"),
            Self::UpstreamTimeout(Some(after)) => {
                write!(f, "Upstream did not answer within {} s", after.as_secs_f64())
            }
            Self::UpstreamTimeout(None) => f.write_str("Upstream did not answer in time"),
            Self::MissingContext(what) => {
                write!(f, "Internal error: the stack is missing the '{what}' context")
            }
        }
    }
}

impl StdError for GatewayError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cause_in_chain() {
        #[derive(Debug)]
        struct Wrapper(GatewayError);
        impl fmt::Display for Wrapper {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("wrapper")
            }
        }
        impl StdError for Wrapper {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(&self.0)
            }
        }
        let err: BoxError = Box::new(Wrapper(GatewayError::NotFound("x".into())));
        assert_eq!(GatewayError::find(&*err), Some(&GatewayError::NotFound("x".into())));
    }

    #[test]
    fn rate_limited_sets_retry_after_rounded_up() {
        let err = GatewayError::RateLimited {
            retry_after: Some(Duration::from_millis(1500)),
            tried: vec!["a".into(), "b".into()],
        };
        let response = err.to_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
    }
}
