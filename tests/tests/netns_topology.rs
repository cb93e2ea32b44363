//! The namespace harness itself, without the balancer: the standard layout connects its
//! namespaces (plain kernel routing through `lb`), closures run in the namespace they name,
//! and everything is removed after a drop, also when a test panics.

use std::time::Duration;

use lb_tests::{
    EchoServer, Netns, Topology,
    echo::random_payload,
    echo_exchange, in_netns, netns, require_root,
    topology::layout::{BACKEND1, BACKEND2, CLIENT},
};

#[test]
fn layout_routes_client_to_backends_and_is_removed_on_drop() {
    if !require_root("layout_routes_client_to_backends_and_is_removed_on_drop") {
        return;
    }
    let topo = Topology::balancer("topo").unwrap();
    let names = topo.names();
    assert_eq!(names.len(), 4);
    assert!(names.iter().all(|n| netns::exists(n)));

    let [b1, b2] = Topology::backends();
    let s1 = EchoServer::start(topo.ns(BACKEND1).name(), b1).unwrap();
    let s2 = EchoServer::start(topo.ns(BACKEND2).name(), b2).unwrap();
    // Without the daemon the lb namespace forwards as a router: the client reaches each
    // backend directly, through both veth pairs.
    for (target, n) in [(b1, 1000), (b2, 300_000)] {
        let payload = random_payload(n);
        let x = in_netns(topo.ns(CLIENT).name(), || {
            echo_exchange(target, &payload, Duration::from_secs(10))
        })
        .unwrap();
        assert_eq!(x.local.ip().to_string(), "10.0.1.2");
        assert!(
            x.received == payload,
            "echo from {target} differs ({} bytes back of {n})",
            x.received.len()
        );
    }
    let (served1, served2) = (s1.stop(), s2.stop());
    assert_eq!((served1.len(), served2.len()), (1, 1));
    // Routed, not NATed: the backends see the client's own address.
    assert_eq!(served1[0].peer.ip().to_string(), "10.0.1.2");
    assert_eq!(served2[0].bytes, 300_000);

    drop(topo);
    for n in &names {
        assert!(!netns::exists(n), "namespace {n} survived the drop");
    }
}

#[test]
fn closures_run_inside_the_namespace() {
    if !require_root("closures_run_inside_the_namespace") {
        return;
    }
    let ns = Netns::new("enter");
    ns.run("ip link add d0 type veth peer name d1 && ip link set d0 up");
    // /sys/class/net describes the namespace entered, not the host's.
    let mut ifaces: Vec<String> = ns.enter(|| {
        std::fs::read_dir("/sys/class/net")
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    });
    ifaces.sort();
    assert_eq!(ifaces, ["d0", "d1", "lo"]);
    // The caller's own view is untouched.
    let host_view = || {
        let mut v: Vec<String> = std::fs::read_dir("/sys/class/net")
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let before = host_view();
    assert!(ns.enter(|| std::path::Path::new("/sys/class/net/d0").exists()));
    assert_eq!(host_view(), before);
    // A panic inside the closure reaches the caller.
    let r = std::panic::catch_unwind(|| ns.enter(|| panic!("boom inside")));
    assert!(r.is_err());
}

#[test]
fn namespaces_are_removed_when_a_test_panics() {
    if !require_root("namespaces_are_removed_when_a_test_panics") {
        return;
    }
    let names = std::sync::Mutex::new(Vec::new());
    let r = std::panic::catch_unwind(|| {
        let topo = Topology::balancer("panic").unwrap();
        *names.lock().unwrap() = topo.names();
        panic!("a failing assertion");
    });
    assert!(r.is_err());
    let names = names.into_inner().unwrap();
    assert_eq!(names.len(), 4);
    for n in &names {
        assert!(!netns::exists(n), "namespace {n} survived the panic");
    }
}
