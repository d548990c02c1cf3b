//! Issue 3 through the reference proxy: path metadata, credentials, insertion ids.
