//! `--jnlp-url`: start from a node's `jenkins-agent.jnlp` descriptor, as agent.jar's `-jnlpUrl` does.
//!
//! The agent already holds its secret, so it asks for the descriptor sealed with that secret
//! (`?encrypt=true`) and needs no API token; the descriptor then gives the controller URL, the
//! transport and the work dir in Jenkins' argument order.

use crate::auth;
use crate::dial::{self, DialError, Target, Tls};

/// Largest descriptor accepted (they are well under 2 KiB).
const MAX_DESCRIPTOR: usize = 64 * 1024;

/// What a descriptor says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// Node secret (the first argument).
    pub secret: String,
    /// Node name (the second argument).
    pub name: String,
    /// `-webSocket` was given.
    pub websocket: bool,
    /// `-workDir DIR`.
    pub work_dir: Option<String>,
    /// `-url URL`.
    pub url: Option<String>,
    /// `-direct HOST:PORT`.
    pub direct: Option<String>,
    /// `-instanceIdentity FINGERPRINT`: the controller's public-key fingerprint to pin.
    pub instance_identity: Option<String>,
}

/// Why fetching a descriptor failed.
#[derive(Debug)]
pub enum JnlpError {
    /// The URL or the answer cannot be used; retrying will not help.
    Fatal(String),
    /// The controller says there is no such node.
    UnknownNode(String),
    /// The descriptor did not open with our secret.
    WrongSecret(String),
    /// The controller could not be reached; try again later.
    Dial(DialError),
    /// The controller answered with a server error; try again later.
    Retry(String),
}

/// Split `http://host:port/prefix/computer/NAME/jenkins-agent.jnlp` into the controller's base
/// URL and the node name.
pub fn split_url(url: &str) -> Result<(String, String), String> {
    let bad =
        || format!("bad --jnlp-url {url:?}: expected http(s)://HOST:PORT/computer/NAME/jenkins-agent.jnlp");
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let rest = path.strip_suffix("/jenkins-agent.jnlp").or_else(|| path.strip_suffix("/slave-agent.jnlp"));
    let (base, name) = rest.and_then(|r| r.rsplit_once("/computer/")).ok_or_else(bad)?;
    if name.is_empty() || name.contains('/') {
        return Err(bad());
    }
    Ok((format!("{base}/"), percent_encoding::percent_decode_str(name).decode_utf8_lossy().into_owned()))
}

/// Read the `<argument>`s of the `<application-desc>` in Jenkins' order: secret, name, then
/// `-webSocket`, `-workDir DIR`, `-url URL`, `-direct HOST:PORT`, `-instanceIdentity FP` in any
/// order (others ignored).
pub fn parse(xml: &str) -> Result<Descriptor, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("the descriptor is not XML: {e}"))?;
    let desc = doc
        .descendants()
        .find(|n| n.has_tag_name("application-desc"))
        .ok_or("the descriptor has no <application-desc>")?;
    let args: Vec<String> = desc
        .children()
        .filter(|n| n.has_tag_name("argument"))
        .map(|n| n.text().unwrap_or("").trim().to_string())
        .collect();
    let mut it = args.into_iter();
    let (secret, name) = match (it.next(), it.next()) {
        (Some(s), Some(n)) if !s.starts_with('-') && !n.starts_with('-') => (s, n),
        _ => return Err("the descriptor does not start with the secret and the node name".into()),
    };
    let mut d = Descriptor {
        secret,
        name,
        websocket: false,
        work_dir: None,
        url: None,
        direct: None,
        instance_identity: None,
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "-webSocket" => d.websocket = true,
            "-workDir" => d.work_dir = it.next(),
            "-url" => d.url = it.next(),
            "-direct" => d.direct = it.next(),
            "-instanceIdentity" => d.instance_identity = it.next(),
            _ => {}
        }
    }
    Ok(d)
}

/// Fetch and open the descriptor at `url` for node `name` with `secret`.
pub async fn fetch(url: &str, name: &str, secret: &str, tls: Option<&Tls>) -> Result<Descriptor, JnlpError> {
    let target: Target = dial::parse_url(url).map_err(|e| JnlpError::Fatal(e.to_string()))?;
    // parse_url keeps the whole path as its prefix; here it is the descriptor's path.
    let path = format!("{}?encrypt=true", target.prefix.trim_end_matches('/'));
    let answer = dial::http_get(&target, tls, &path, MAX_DESCRIPTOR, false).await.map_err(JnlpError::Dial)?;
    match answer.status {
        200 => {}
        404 => {
            return Err(JnlpError::UnknownNode(format!("{url}: the controller has no node named '{name}'")))
        }
        s if s >= 500 || s == 0 => return Err(JnlpError::Retry(format!("{url} answered HTTP {s}"))),
        s => {
            let why = String::from_utf8_lossy(&answer.body[..answer.body.len().min(300)]).trim().to_string();
            return Err(JnlpError::Fatal(format!("{url} answered HTTP {s}: {why}")));
        }
    }
    let plain = auth::open_descriptor(secret, name, &answer.body).ok_or_else(|| {
        JnlpError::WrongSecret(format!(
            "the descriptor at {url} does not open with this secret: is it node '{name}''s secret?"
        ))
    })?;
    let xml =
        String::from_utf8(plain).map_err(|_| JnlpError::Fatal(format!("{url}: descriptor is not UTF-8")))?;
    let d = parse(&xml).map_err(|e| JnlpError::Fatal(format!("{url}: {e}")))?;
    if d.name != name || !auth::constant_time_eq(d.secret.as_bytes(), secret.as_bytes()) {
        return Err(JnlpError::Fatal(format!("{url}: the descriptor is for another node ('{}')", d.name)));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_controller_and_node() {
        assert_eq!(
            split_url("http://ci:8080/computer/n1/jenkins-agent.jnlp").unwrap(),
            ("http://ci:8080/".to_string(), "n1".to_string())
        );
        assert_eq!(
            split_url("https://ci.example.com/jenkins/computer/arm%20box/slave-agent.jnlp?x=1").unwrap(),
            ("https://ci.example.com/jenkins/".to_string(), "arm box".to_string())
        );
        assert!(split_url("http://ci:8080/computer/n1/").is_err());
        assert!(split_url("http://ci:8080/computer//jenkins-agent.jnlp").is_err());
    }

    #[test]
    fn descriptors_parse_in_jenkins_argument_order() {
        let xml = "<jnlp><application-desc main-class=\"hudson.remoting.jnlp.Main\">\
                   <argument>abc</argument><argument>n&amp;1</argument><argument>-webSocket</argument>\
                   <argument>-workDir</argument><argument>/home/jenkins/agent</argument>\
                   <argument>-url</argument><argument>http://ci:8080/</argument></application-desc></jnlp>";
        let d = parse(xml).unwrap();
        assert_eq!(d.secret, "abc");
        assert_eq!(d.name, "n&1");
        assert!(d.websocket);
        assert_eq!(d.work_dir.as_deref(), Some("/home/jenkins/agent"));
        assert_eq!(d.url.as_deref(), Some("http://ci:8080/"));
        assert!(parse("<jnlp/>").is_err());
        assert!(parse("<jnlp><application-desc><argument>a</argument>").is_err(), "not closed");
        assert!(parse("<application-desc><argument>-url</argument></application-desc>").is_err());
    }
}
