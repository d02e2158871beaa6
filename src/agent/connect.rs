//! The agent's old path to the dial code, which now lives in [`crate::dial`]: the same names, with
//! errors as text where the agent's call sites still take text. Use `crate::dial` (and
//! [`DialError::is_permanent`](crate::dial::DialError::is_permanent)) directly and delete this file.

use crate::dial;
use crate::link::{LinkReader, LinkWriter};

pub use crate::dial::{split_host_port, HttpAnswer, Mode, Target, Tls, CONNECT_TIMEOUT};

/// [`dial::parse_url`] with the error as text.
pub fn parse_url(url: &str) -> Result<Target, String> {
    Ok(dial::parse_url(url)?)
}

/// [`dial::open`] with the error as text.
pub async fn open(
    target: &Target,
    mode: &Mode,
    name: &str,
    tls: Option<&Tls>,
) -> Result<(LinkReader, LinkWriter), String> {
    Ok(dial::open(target, mode, name, tls).await?)
}

/// [`dial::http_get`] with the error as text.
pub async fn http_get(
    target: &Target,
    tls: Option<&Tls>,
    path_and_query: &str,
    max: usize,
    head_only: bool,
) -> Result<HttpAnswer, String> {
    Ok(dial::http_get(target, tls, path_and_query, max, head_only).await?)
}

/// [`dial::discover_port`] with the error as text.
pub async fn discover_port(target: &Target, tls: Option<&Tls>) -> Result<u16, String> {
    Ok(dial::discover_port(target, tls).await?)
}
