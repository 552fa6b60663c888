//! Golden tests: the shipped files compile; broken files give exact errors with path and line.

use std::path::Path;

use super::*;
use crate::access_log::AccessLogOutput;
use crate::config::ConfigError;

fn compile_text(text: &str) -> Result<Snapshot, Vec<ConfigError>> {
    // The shipped configs read their secrets from KINGDOM_* variables.
    let env = |name: &str| {
        name.starts_with("KINGDOM_")
            .then(|| "a-secret-for-tests-only".to_string())
    };
    compile(text, &env)
}

fn load_file(file: &str) -> Result<Snapshot, Vec<ConfigError>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    compile_text(&std::fs::read_to_string(path).unwrap())
}

const MINIMAL: &str = "\
listeners: [{ name: public, address: 127.0.0.1:8080 }]
pools:
  api:
    backends: [{ address: 127.0.0.1:9201 }]
routes:
  - { name: api, match: { path_prefix: /v1 }, pool: api }
";

fn errors(text: &str) -> Vec<String> {
    match compile_text(text) {
        Ok(_) => vec![],
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn default_config_matches_the_documented_layout() {
    let snapshot = load_file("conf/edge.yaml").unwrap();
    assert_eq!(snapshot.listeners[0].address.to_string(), "127.0.0.1:8080");
    assert_eq!(
        snapshot.admin.as_ref().unwrap().address.to_string(),
        "127.0.0.1:9090"
    );
    let api = snapshot.pools.iter().find(|p| p.name == "api").unwrap();
    let weights: Vec<u32> = api.backends.iter().map(|b| b.weight).collect();
    assert_eq!(weights, [3, 1]);
}

#[test]
fn minimal_config_gets_documented_defaults() {
    let snapshot = compile_text(MINIMAL).unwrap();
    assert_eq!(snapshot.server.threads, 2);
    assert_eq!(snapshot.server.shutdown_timeout.as_secs(), 30);
    assert!(snapshot.admin.is_none());
    assert_eq!(snapshot.access_log, AccessLogOutput::Stdout);
    let pool = &snapshot.pools[0];
    assert_eq!(pool.balance, "weighted_round_robin");
    assert_eq!(pool.timeouts.connect.as_secs(), 1);
    assert_eq!(pool.timeouts.read.as_secs(), 30);
}

#[test]
fn broken_files_give_exact_errors() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "unknown key",
            "pools:\n  api:\n    backends: [{ address: 127.0.0.1:9201 }]\n    colour: blue\n",
            &[
                "line 4: pools.api: unknown field `colour`, expected one of `balance`, `hash_key`, `backends`, `timeouts`, `health_check`, `outlier`, `panic`, `limits`, `retries`, `slow_start`, `sticky`",
                "missing field `listeners`",
                "missing field `routes`",
            ],
        ),
        (
            "every shape error, each at its line",
            "listeners: [{ name: public, address: 127.0.0.1:8080, colour: red }]\npools:\n  api:\n    backends: [{ address: 127.0.0.1:9201, weight: heavy }]\n  web:\n    backends: []\n    timeouts: { connect: soon }\nroutes:\n  - { name: api, pool: api, extra: 1 }\n",
            &[
                "line 1: listeners[0]: unknown field `colour`, expected one of `name`, `address`, `tls`, `default_host`, `h2c`",
                "line 4: pools.api.backends[0].weight: invalid type: string \"heavy\", expected u32",
                "line 7: pools.web.timeouts.connect: `soon` is not a duration (e.g. 250ms, 2s, 15m, 1h)",
                "line 9: routes[0]: unknown field `extra`, expected one of `name`, `match`, `pool`, `max_body`, `escaped_slashes`, `request_limits`, `auth`, `rate_limit`, `slow_down`, `priority`, `methods`, `content_types`, `security_headers`, `cors`, `cache`",
            ],
        ),
        (
            "a key given twice",
            "listeners: []\npools: {}\nroutes: []\npools: {}\n",
            &["line 4: pools: duplicate key (first given at line 2)"],
        ),
        (
            "bad duration",
            "listeners: []\npools:\n  api:\n    backends: [{ address: 127.0.0.1:1 }]\n    timeouts: { connect: 5 }\nroutes: []\n",
            &["line 5: pools.api.timeouts.connect: `5` needs a unit: ms, s, m or h (e.g. 250ms, 2s)"],
        ),
        (
            "bad size",
            "listeners: []\npools: {}\nroutes:\n  - { name: a, pool: a, max_body: 64KB }\n",
            &["line 4: routes[0].max_body: `64KB` has an unknown unit `KB`: use B, KiB, MiB or GiB"],
        ),
        (
            "unknown balancer",
            "listeners: []\npools:\n  api:\n    balance: random\n    backends: []\nroutes: []\n",
            &["line 4: pools.api.balance: unknown variant `random`, expected one of `weighted_round_robin`, `least_connections`, `consistent_hash`"],
        ),
        (
            "yaml syntax",
            "listeners: [\n",
            &["line 2: did not find expected node content"],
        ),
        (
            "semantic errors, all of them",
            "\
server:
  threads: 0
  shutdown_timeout: 10s
  trusted_proxies: [10.0.0.0/33]
listeners:
  - { name: public, address: 127.0.0.1:8080 }
  - { name: public, address: 0.0.0.0:8080 }
admin: { address: localhost:9090 }
sidecars:
  - { name: api, command: kingdom-api, addresses: [127.0.0.1:9201, 127.0.0.1:9201] }
pools:
  api:
    backends:
      - { address: 127.0.0.1:9201, weight: 3 }
      - { address: 127.0.0.1:9201 }
      - { address: 127.0.0.1:9202, weight: 0 }
    timeouts: { connect: 0s }
routes:
  - { name: api, match: { path_prefix: v1 }, pool: api }
  - { name: api, match: { methods: [get] }, pool: missing, max_body: 0 }
",
            &[
                "line 2: server.threads: must be between 1 and 256 (got 0)",
                "line 4: server.trusted_proxies[0]: `10.0.0.0/33` is not an IP address or CIDR range",
                "line 7: listeners[1].name: duplicate listener name `public`",
                "line 7: listeners[1].address: 0.0.0.0:8080 conflicts with 127.0.0.1:8080 at listeners[0].address",
                "line 8: admin.address: `localhost:9090` is not an address like 127.0.0.1:8080 or [::1]:8080",
                "line 10: sidecars[0].addresses[1]: 127.0.0.1:9201 conflicts with 127.0.0.1:9201 at sidecars[0].addresses[0]",
                "line 15: pools.api.backends[1].address: duplicate backend 127.0.0.1:9201 in pool `api`",
                "line 16: pools.api.backends[2].weight: must be between 1 and 1000 (got 0)",
                "line 17: pools.api.timeouts.connect: must be > 0 (got 0s)",
                "line 19: routes[0].match.path_prefix: must start with `/` (got `v1`)",
                "line 20: routes[1].name: duplicate route name `api`",
                "line 20: routes[1].match.methods[0]: `get` is not an upper-case HTTP method",
                "line 20: routes[1].max_body: must be > 0 (got 0B)",
                "line 20: routes[1].pool: no pool named `missing` under `pools:`",
            ],
        ),
        (
            "h2c on a TLS listener",
            "listeners:\n  - name: public\n    address: 127.0.0.1:8443\n    h2c: true\n    tls: { certificates: [{ cert: a.crt, key: a.key }] }\npools:\n  api:\n    backends: [{ address: 127.0.0.1:9201 }]\nroutes: [{ name: api, pool: api }]\n",
            &["line 4: listeners[0].h2c: is for plain listeners; a TLS listener offers HTTP/2 through ALPN (`tls.http2`)"],
        ),
        (
            "empty sections",
            "listeners: []\npools: {}\nroutes: []\n",
            &[
                "line 1: listeners: at least one listener is needed",
                "line 2: pools: at least one pool is needed",
                "line 3: routes: at least one route is needed",
            ],
        ),
    ];
    for (name, text, want) in cases {
        let got = errors(text);
        assert_eq!(got, *want, "case: {name}");
    }
}

#[test]
fn one_mistake_in_a_full_file_is_one_error() {
    // The shipped file uses every top-level section: a mistake in one of them must not
    // make the others look unknown.
    let text = std::fs::read_to_string("conf/edge.yaml").unwrap();
    let planted = [
        (
            "cache: { memory: 64MiB,",
            "cache: { memory: 64MiB, colour: red,",
            "cache: unknown field `colour`",
        ),
        (
            "  api:\n",
            "  api:\n    colour: red\n",
            "pools.api: unknown field `colour`",
        ),
    ];
    for (from, to, want) in planted {
        assert!(text.contains(from), "{from}");
        let got = errors(&text.replacen(from, to, 1));
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].contains(want), "{got:?}");
    }
}

#[test]
fn a_valid_file_has_no_errors() {
    assert_eq!(errors(MINIMAL), Vec::<String>::new());
}

#[test]
fn an_admin_api_reachable_from_other_hosts_needs_a_token() {
    let with_admin = |admin: &str, env: &dyn Fn(&str) -> Option<String>| {
        let text = format!("{MINIMAL}admin: {admin}\n");
        compile(&text, env).map(|s| s.admin.unwrap().token)
    };
    let none = |_: &str| None;
    let token = |_: &str| Some("an-admin-token-of-32-bytes-length".to_string());
    let short = |_: &str| Some("short".to_string());
    assert_eq!(
        with_admin("{ address: 127.0.0.1:9090 }", &none).unwrap(),
        None,
        "loopback needs no token"
    );
    let refused = with_admin("{ address: 0.0.0.0:9090 }", &none).unwrap_err();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].path, "admin.address");
    assert!(
        refused[0].message.contains("reachable from other hosts"),
        "{}",
        refused[0].message
    );
    assert_eq!(
        with_admin("{ address: 0.0.0.0:9090, token_env: T }", &token)
            .unwrap()
            .as_deref(),
        Some("an-admin-token-of-32-bytes-length")
    );
    let unset = with_admin("{ address: 127.0.0.1:9090, token_env: T }", &none).unwrap_err();
    assert_eq!(
        unset[0].to_string(),
        "line 7: admin.token_env: environment variable `T` is not set"
    );
    let weak = with_admin("{ address: 127.0.0.1:9090, token_env: T }", &short).unwrap_err();
    assert!(weak[0].message.contains("at least 16 bytes"), "{weak:?}");
}

#[test]
fn compiling_creates_no_live_state_and_activating_binds_it() {
    use std::sync::Arc;
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let live = crate::live::LiveState::new(metrics.clone());
    let mut first = compile_text(MINIMAL).unwrap();
    first.pools[0].backends[0].state.metrics.healthy.set(7);
    activate(&mut first, &live);
    assert_eq!(
        first.pools[0].backends[0].state.metrics.healthy.get(),
        1,
        "the compiled snapshot's own handles are replaced by the shared ones"
    );
    assert!(metrics.render().contains("127.0.0.1:9201"));
    let mut second = compile_text(MINIMAL).unwrap();
    activate(&mut second, &live);
    assert!(
        Arc::ptr_eq(
            &first.pools[0].backends[0].state,
            &second.pools[0].backends[0].state
        ),
        "an unchanged backend keeps its state"
    );
    assert!(Arc::ptr_eq(&first.pools[0].state, &second.pools[0].state));
}

#[test]
fn an_upgrade_can_hand_over_every_sidecar() {
    let addresses = |n: u16| {
        (0..n)
            .map(|i| format!("127.0.0.1:{}", 20_000 + i))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let with = |n| {
        format!(
            "{MINIMAL}sidecars: [{{ name: s, command: kingdom-api, addresses: [{}] }}]\n",
            addresses(n)
        )
    };
    assert_eq!(errors(&with(84)), Vec::<String>::new(), "1 + 3 x 84 = 253");
    assert_eq!(
        errors(&with(85)),
        ["line 7: sidecars: 85 processes are too many to hand over in an upgrade (3 descriptors each, with the listeners at most 253)"]
    );
}

#[test]
fn a_route_that_checks_tokens_needs_the_token_secret() {
    let with_auth = MINIMAL.replace("pool: api }", "pool: api, auth: required }");
    assert_eq!(
        errors(&with_auth),
        ["line 6: routes[0].auth: needs `tokens:` (the secret kingdom-api signs its tokens with)"]
    );
    let with_tokens = format!("{with_auth}tokens: {{ secret_env: KINGDOM_API_SECRET }}\n");
    assert_eq!(errors(&with_tokens), Vec::<String>::new());
    let short = format!("{with_auth}tokens: {{ secret: short }}\n");
    assert_eq!(
        errors(&short),
        ["line 7: tokens.secret: the token secret must be at least 16 bytes"]
    );
}
