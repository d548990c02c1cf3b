//! [`Reloadable`]: a value that can be replaced while requests run (secrets rotated without a
//! restart).

use std::{fmt, sync::Arc};

use arc_swap::ArcSwap;
use http::request::Parts;

use crate::auth::{AuthFuture, AuthProvider, StaticApiKeys};

/// A shared value that [`replace`](Self::replace) swaps atomically: every reader sees either the
/// old value or the new one, never a mix, and one that took the value keeps it while it runs (a
/// request in flight finishes with the keys it started with). Clones share the value.
///
/// [`ProjectLayer`](crate::ProjectLayer) reads `Reloadable<Projects>`;
/// `Reloadable<StaticApiKeys>` is an [`AuthProvider`].
pub struct Reloadable<T>(Arc<ArcSwap<T>>);

impl<T> Reloadable<T> {
    /// Holding `value`.
    pub fn new(value: T) -> Self {
        Self(Arc::new(ArcSwap::from_pointee(value)))
    }

    /// The value now.
    pub fn current(&self) -> Arc<T> {
        self.0.load_full()
    }

    /// Swaps `value` in for every clone.
    pub fn replace(&self, value: T) {
        self.0.store(Arc::new(value));
    }
}

impl<T> Clone for Reloadable<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T: Default> Default for Reloadable<T> {
    fn default() -> Self {
        Self::new(T::default())
    }
}

impl<T> From<Arc<T>> for Reloadable<T> {
    fn from(value: Arc<T>) -> Self {
        Self(Arc::new(ArcSwap::new(value)))
    }
}

/// The current value's `Debug` (the credential types show no keys).
impl<T: fmt::Debug> fmt::Debug for Reloadable<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Reloadable").field(&*self.0.load()).finish()
    }
}

/// The keys current when the request arrives decide it.
impl AuthProvider for Reloadable<StaticApiKeys> {
    fn authenticate<'a>(&'a self, request: &'a Parts) -> AuthFuture<'a> {
        Box::pin(std::future::ready(self.0.load().check(&request.headers).map(Some)))
    }

    fn consumes_authorization(&self) -> bool {
        true
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use http::{Request, StatusCode, header};

    use super::*;

    #[tokio::test]
    async fn replaced_keys_decide_the_next_request() {
        let keys = Reloadable::new(StaticApiKeys::new(["sk-old"]));
        let provider: Arc<dyn AuthProvider> = Arc::new(keys.clone());
        let head = |key: &str| {
            Request::get("/").header(header::AUTHORIZATION, format!("Bearer {key}")).body(()).unwrap().into_parts().0
        };
        assert!(provider.authenticate(&head("sk-old")).await.is_ok());
        keys.replace(StaticApiKeys::new(["sk-new"]));
        assert!(provider.authenticate(&head("sk-new")).await.is_ok());
        let refused = provider.authenticate(&head("sk-old")).await.unwrap_err();
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
        assert!(provider.consumes_authorization());
        assert!(!format!("{keys:?}").contains("sk-"));
    }
}
