//! Per-device topic ACLs.
//!
//! An authenticated device may publish under `devices/{its id}/...` and
//! subscribe to its own command topic (`devices/{its id}/cmd`, or below it). An operator may
//! grant more, per device, as MQTT topic filters (a gateway publishing for
//! the devices behind it: `devices/child-7/#`). A subscription is allowed
//! only if every topic it could ever match is allowed: its filter must lie
//! within a granted one, not merely overlap it (`#` is not within
//! `devices/a/#`).
//!
//! An anonymous client (`auth.allow_anonymous`) has no proven identity, so
//! an "own topics" rule would only ask it to pick the right client id: it
//! may publish and subscribe anywhere. Anonymous access is for development
//! and closed networks.

use fluxmesh_schemas::subject::COMMAND_CHANNEL;
use fluxmesh_schemas::DeviceTopic;

/// What one authenticated (or anonymous) device may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub device: String,
    /// Extra topic filters it may publish to.
    pub publish: Vec<String>,
    /// Extra topic filters it may subscribe within.
    pub subscribe: Vec<String>,
    /// How it got in.
    pub method: Method,
    /// The revision of the credentials entry it was granted under; 0 when
    /// there was none (anonymous, admin).
    pub revision: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Anonymous,
    Secret,
    /// A backend with the admin token (HTTP only): any device.
    Admin,
}

impl Grant {
    /// A device with no grants beyond its own topics.
    pub fn own(device: &str, method: Method) -> Grant {
        Grant { device: device.to_owned(), publish: Vec::new(), subscribe: Vec::new(), method, revision: 0 }
    }

    /// Whether this device may publish to `topic` (a topic name, no
    /// wildcards).
    pub fn may_publish(&self, topic: &str) -> bool {
        if matches!(self.method, Method::Admin | Method::Anonymous) {
            return true;
        }
        if DeviceTopic::parse(topic).is_ok_and(|t| t.device == self.device) {
            return true;
        }
        !topic.contains(['+', '#']) && self.publish.iter().any(|f| rumqttc::mqttbytes::matches(topic, f))
    }

    /// Whether this device may subscribe to `filter`.
    pub fn may_subscribe(&self, filter: &str) -> bool {
        if matches!(self.method, Method::Admin | Method::Anonymous) {
            return true;
        }
        let own = format!("devices/{}/{COMMAND_CHANNEL}", self.device);
        if within(filter, &own) || within(filter, &format!("{own}/#")) {
            return true;
        }
        self.subscribe.iter().any(|granted| within(filter, granted))
    }
}

/// Whether every topic `filter` matches is also matched by `granted`.
/// Both are MQTT topic filters (levels split at `/`, `+` one level, `#`
/// the rest, including the parent level).
pub fn within(filter: &str, granted: &str) -> bool {
    let mut f = filter.split('/');
    let mut g = granted.split('/');
    loop {
        match (f.next(), g.next()) {
            (_, Some("#")) => return g.next().is_none(),
            (Some("#"), _) => return false,
            (Some("+"), Some("+")) => {}
            (Some("+"), Some(_)) => return false,
            (Some(_), Some("+")) => {}
            (Some(a), Some(b)) if a == b => {}
            (Some(_), Some(_)) => return false,
            (None, None) => return true,
            // `a/#` also matches `a`.
            (None, Some(_)) => return false,
            (Some(_), None) => return false,
        }
    }
}

/// Checks an operator's grant list: at most 32 valid filters.
pub fn check_filters(what: &'static str, filters: &[String]) -> Result<(), BadFilters> {
    if filters.len() > 32 {
        return Err(BadFilters::TooMany { what });
    }
    for f in filters {
        if f.is_empty() || f.len() > 512 || !rumqttc::mqttbytes::valid_filter(f) || f.starts_with('$') {
            return Err(BadFilters::Invalid { what, filter: f.clone() });
        }
    }
    Ok(())
}

/// Why a grant's filters were refused.
#[derive(Debug, thiserror::Error)]
pub enum BadFilters {
    #[error("{what}: at most 32 filters")]
    TooMany { what: &'static str },
    #[error("{what}: `{filter}` is not a valid MQTT topic filter")]
    Invalid { what: &'static str, filter: String },
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn containment() {
        for (f, g, ok) in [
            ("devices/a/cmd", "devices/a/cmd", true),
            ("devices/a/cmd/x", "devices/a/cmd/#", true),
            ("devices/a/cmd", "devices/a/cmd/#", true),
            ("devices/a/#", "devices/a/cmd/#", false),
            ("#", "devices/a/#", false),
            ("devices/+/cmd", "devices/a/cmd", false),
            ("devices/a/cmd", "devices/+/cmd", true),
            ("devices/+/cmd", "devices/+/cmd", true),
            ("devices/+/cmd", "devices/#", true),
            ("devices/a", "devices/a/b", false),
            ("devices/a/b", "devices/a", false),
            ("a/+/#", "a/+/#", true),
            ("a/+/#", "a/b/#", false),
        ] {
            assert_eq!(within(f, g), ok, "{f} within {g}");
        }
    }

    #[test]
    fn device_rights() {
        let g = Grant {
            device: "gw".into(),
            publish: vec!["devices/child/#".into()],
            subscribe: vec!["alerts/+".into()],
            method: Method::Secret,
            revision: 1,
        };
        assert!(g.may_publish("devices/gw/temp"));
        assert!(g.may_publish("devices/child/temp"));
        assert!(!g.may_publish("devices/other/temp"));
        assert!(!g.may_publish("devices/gw"));
        assert!(!g.may_publish("devices/+/temp"), "wildcards are never topics");
        assert!(g.may_subscribe("devices/gw/cmd"));
        assert!(g.may_subscribe("alerts/x"));
        assert!(!g.may_subscribe("alerts/#"));
        assert!(!g.may_subscribe("devices/+/cmd"));
        assert!(!g.may_subscribe("#"));
        assert!(!g.may_subscribe("devices/gw/temp"));
        let anonymous = Grant::own("anon", Method::Anonymous);
        assert!(anonymous.may_publish("devices/other/t") && anonymous.may_subscribe("#"));
        assert!(check_filters("publish", &["a/#".into()]).is_ok());
        assert!(check_filters("publish", &["a/#/b".into()]).is_err());
        assert!(check_filters("publish", &["$SYS/#".into()]).is_err());
    }

    fn filter() -> impl Strategy<Value = String> {
        (proptest::collection::vec(prop::sample::select(vec!["a", "b", "+", ""]), 0..4), any::<bool>()).prop_map(
            |(mut levels, hash)| {
                if hash || levels.is_empty() {
                    levels.push("#");
                }
                levels.join("/")
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5000))]

        /// Whatever `within` lets through cannot reach a topic the grant
        /// does not cover.
        #[test]
        fn within_never_widens(f in filter(), g in filter(), topic in proptest::collection::vec(prop::sample::select(vec!["a", "b", "c", ""]), 1..6)) {
            let topic = topic.join("/");
            if within(&f, &g) && rumqttc::mqttbytes::matches(&topic, &f) {
                prop_assert!(rumqttc::mqttbytes::matches(&topic, &g), "{} matches {} within {} but not {}", topic, f, g, g);
            }
        }

        #[test]
        fn a_filter_is_within_itself(f in filter()) {
            prop_assert!(within(&f, &f));
        }
    }
}
