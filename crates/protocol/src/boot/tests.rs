//! The kernel command line both ways: the exact arguments the host writes, what the
//! guest refuses, and round trips of arbitrary configurations.

use proptest::prelude::*;

use super::*;

fn volume(tag: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        tag: tag.into(),
        path: path.into(),
        read_only,
    }
}

/// A configuration like the host's for a persistent sandbox on the user network.
fn host_config() -> BootConfig {
    BootConfig {
        root: Some(DiskRef::Serial(ROOT_DISK_ID.into())),
        ident: Some(DiskRef::Serial(IDENTITY_DISK_ID.into())),
        openshell: Some(DiskRef::Serial(OPENSHELL_DISK_ID.into())),
        upper: Upper::Disk(DiskRef::Serial(UPPER_DISK_ID.into())),
        port: CHANNEL_PORT.into(),
        hostname: "box-1".into(),
        net: Some(NetConfig {
            address: Ipv4Addr::new(10, 0, 2, 15),
            prefix_len: 24,
            gateway: Some(Ipv4Addr::new(10, 0, 2, 2)),
            dns: Some(Ipv4Addr::new(10, 0, 2, 3)),
        }),
        volumes: vec![
            volume("vol0", "/data", false),
            volume("vol1", "/srv/in", true),
        ],
        tmpfs: Vec::new(),
        hosts: Vec::new(),
        dns: Vec::new(),
        read_only: false,
        user_namespaces: true,
    }
}

#[test]
fn docker_style_mounts_hosts_and_dns_round_trip() {
    let config = BootConfig {
        tmpfs: vec![TmpfsMount {
            path: "/scratch space".into(),
            mode: 0o1777,
            size_bytes: Some(1 << 20),
        }],
        hosts: vec![HostEntry {
            name: "db.local".into(),
            address: "10.1.2.3".parse().unwrap(),
        }],
        dns: vec!["1.1.1.1".parse().unwrap(), "2001:db8::1".parse().unwrap()],
        read_only: true,
        ..host_config()
    };
    let args = config.kernel_args().unwrap();
    assert_eq!(
        args[args.len() - 7..],
        [
            "kiln.ro=on",
            "kiln.vol=vol0,/data",
            "kiln.vol=vol1,/srv/in,ro",
            "kiln.tmpfs=/scratch%20space,1777,1048576",
            "kiln.host=db.local,10.1.2.3",
            "kiln.dns=1.1.1.1",
            "kiln.dns=2001:db8::1",
        ]
    );
    assert_eq!(BootConfig::parse(&args.join(" ")).unwrap(), config);
}

#[test]
fn docker_style_arguments_are_bounded_and_checked() {
    let fault = |cmdline: &str| BootConfig::parse(cmdline).unwrap_err().fault;
    assert_eq!(fault("kiln.tmpfs=/t,9999"), CmdlineFault::TmpfsSyntax);
    assert_eq!(fault("kiln.tmpfs=/t,755,1k"), CmdlineFault::TmpfsSyntax);
    assert_eq!(
        fault("kiln.tmpfs=/t/../x,755"),
        CmdlineFault::GuestPath("/t/../x".into())
    );
    assert_eq!(
        fault("kiln.vol=v,/t kiln.tmpfs=/t,755"),
        CmdlineFault::DuplicateVolume
    );
    assert_eq!(fault("kiln.host=a b"), CmdlineFault::HostSyntax);
    assert_eq!(fault("kiln.host=a/b,1.2.3.4"), CmdlineFault::HostSyntax);
    assert_eq!(
        fault("kiln.host=a,999.1.1.1"),
        CmdlineFault::IpAddress("999.1.1.1".into())
    );
    assert_eq!(fault("kiln.ro=yes"), CmdlineFault::ReadOnly);
    let four_dns = "kiln.dns=1.1.1.1 ".repeat(MAX_DNS_SERVERS + 1);
    assert_eq!(
        fault(&four_dns),
        CmdlineFault::TooMany {
            key: "dns",
            max: MAX_DNS_SERVERS
        }
    );
    let too_many_hosts = BootConfig {
        hosts: vec![
            HostEntry {
                name: "h".into(),
                address: "10.0.0.1".parse().unwrap()
            };
            MAX_EXTRA_HOSTS + 1
        ],
        ..BootConfig::default()
    };
    assert_eq!(too_many_hosts.kernel_args().unwrap_err().key, "host");
}

#[test]
fn defaults_when_only_kernel_arguments() {
    let config = BootConfig::parse("console=ttyS0 reboot=t panic=-1 quiet").unwrap();
    assert_eq!(config, BootConfig::default());
    assert_eq!(config.root, None);
    assert_eq!(config.upper, Upper::Tmpfs);
    assert_eq!(config.port, "kiln.0");
    assert_eq!(config.hostname, "kiln");
    assert_eq!(config.net, None);
    assert!(!config.user_namespaces);
}

#[test]
fn user_namespaces_are_off_unless_asked_for() {
    let userns = |cmdline: &str| BootConfig::parse(cmdline).map(|c| c.user_namespaces);
    assert_eq!(userns("kiln.userns=on"), Ok(true));
    assert_eq!(userns("kiln.userns=off"), Ok(false));
    assert_eq!(userns("kiln.userns=on kiln.userns=off"), Ok(false));
    let err = BootConfig::parse("kiln.userns=yes").unwrap_err();
    assert_eq!(err.fault, CmdlineFault::UserNamespaces, "{err}");
    assert!(err.to_string().contains("expected on or off"), "{err}");
}

#[test]
fn the_host_writes_these_arguments() {
    let args = host_config().kernel_args().unwrap();
    assert_eq!(
        args,
        [
            "kiln.root=root",
            "kiln.ident=ident",
            "kiln.openshell=openshell",
            "kiln.upper=upper",
            "kiln.port=kiln.0",
            "kiln.hostname=box-1",
            "kiln.net=10.0.2.15/24,10.0.2.2,10.0.2.3",
            "kiln.userns=on",
            "kiln.vol=vol0,/data",
            "kiln.vol=vol1,/srv/in,ro",
        ]
    );
    let cmdline = format!("console=ttyS0 {} quiet", args.join(" "));
    assert_eq!(BootConfig::parse(&cmdline).unwrap(), host_config());

    assert_eq!(
        BootConfig::default().kernel_args().unwrap(),
        ["kiln.upper=tmpfs", "kiln.port=kiln.0", "kiln.hostname=kiln"]
    );
}

#[test]
fn full_command_line() {
    let config = BootConfig::parse(
        "console=ttyS0 kiln.root=root kiln.ident=/dev/vdb kiln.upper=upper kiln.port=kiln.1 \
         kiln.hostname=box-1 kiln.net=10.0.2.15/24,10.0.2.2,10.0.2.3",
    )
    .unwrap();
    assert_eq!(config.root, Some(DiskRef::Serial("root".into())));
    assert_eq!(config.ident, Some(DiskRef::Path("/dev/vdb".into())));
    assert_eq!(config.upper, Upper::Disk(DiskRef::Serial("upper".into())));
    assert_eq!(config.port, "kiln.1");
    assert_eq!(config.hostname, "box-1");
    assert_eq!(config.net, host_config().net);
}

#[test]
fn volumes_repeat_in_order() {
    let config = BootConfig::parse("kiln.vol=vol0,/data kiln.vol=vol1,/srv/in,ro").unwrap();
    assert_eq!(config.volumes, host_config().volumes);
    for twice in ["kiln.vol=a,/x kiln.vol=a,/y", "kiln.vol=a,/x kiln.vol=b,/x"] {
        let err = BootConfig::parse(twice).unwrap_err();
        assert_eq!(err.fault, CmdlineFault::DuplicateVolume, "{err}");
        assert!(err.to_string().contains("same tag or path"), "{err}");
    }
}

#[test]
fn network_gateway_and_dns_are_optional() {
    let net = |value: &str| BootConfig::parse(&format!("kiln.net={value}")).unwrap().net;
    let only = net("192.168.1.2/32").unwrap();
    assert_eq!((only.gateway, only.dns), (None, None));
    let dns_only = net("192.168.1.2/24,,1.1.1.1").unwrap();
    assert_eq!(dns_only.gateway, None);
    assert_eq!(dns_only.dns, Some(Ipv4Addr::new(1, 1, 1, 1)));
    let args = BootConfig {
        net: Some(dns_only),
        ..BootConfig::default()
    }
    .kernel_args()
    .unwrap();
    assert!(args.contains(&"kiln.net=192.168.1.2/24,,1.1.1.1".to_owned()));
}

#[test]
fn paths_are_escaped_and_read_back() {
    let path = "/données/a b,c\"d%e\u{7f}";
    let config = BootConfig {
        ident: Some(DiskRef::Path("/dev/disk/by-id/x y".into())),
        volumes: vec![volume("vol0", path, true)],
        ..BootConfig::default()
    };
    let args = config.kernel_args().unwrap();
    assert!(args.contains(&"kiln.ident=/dev/disk/by-id/x%20y".to_owned()));
    assert!(args.contains(&"kiln.vol=vol0,/donn%C3%A9es/a%20b%2Cc%22d%25e%7F,ro".to_owned()));
    assert_eq!(BootConfig::parse(&args.join(" ")).unwrap(), config);
}

#[test]
fn bad_arguments_name_the_argument() {
    for bad in [
        "kiln.rot=root",
        "kiln.root",
        "kiln.root=",
        "kiln.root=/dev/",
        "kiln.root=/srv/disk",
        "kiln.root=serial-longer-than-20-bytes",
        "kiln.upper=a,b",
        "kiln.net=10.0.2.15",
        "kiln.net=10.0.2.15/33",
        "kiln.net=10.0.2.15/0",
        "kiln.net=10.0.2.15/24,gateway",
        "kiln.net=10.0.2.15/24,1.1.1.1,2.2.2.2,3.3.3.3",
        "kiln.hostname=a/b",
        "kiln.hostname=a123456789b123456789c123456789d123456789e123456789f123456789g1234",
        "kiln.port=a/b",
        "kiln.vol=vol0",
        "kiln.vol=vol0,data",
        "kiln.vol=vol0,/",
        "kiln.vol=vol0,/a/../b",
        "kiln.vol=vol0,/a/./b",
        "kiln.vol=vol0,/a//b",
        "kiln.vol=vol0,/a/",
        "kiln.vol=vol0,/a,rw",
        "kiln.vol=vol0,/a,ro,x",
        "kiln.vol=,/a",
        "kiln.vol=v/0,/a",
        // Escapes: what the encoder never writes.
        "kiln.vol=vol0,/données",
        "kiln.vol=vol0,/a\"b",
        "kiln.vol=vol0,/a%2",
        "kiln.vol=vol0,/a%2c",
        "kiln.vol=vol0,/a%ZZ",
        "kiln.vol=vol0,/a%41",
        "kiln.vol=vol0,/a%C3",
        "kiln.vol=vol0,/a%00",
        "kiln.vol=vol0,/a%2F..",
        "kiln.userns=1",
        "kiln.userns=ON",
    ] {
        let err = BootConfig::parse(&format!("console=ttyS0 {bad} quiet")).unwrap_err();
        assert_eq!(err.arg, bad, "{err}");
        assert!(err.to_string().starts_with("kernel command line argument"));
    }
}

#[test]
fn faults_say_what_is_wrong() {
    let fault = |arg: &str| BootConfig::parse(arg).unwrap_err().fault;
    assert_eq!(fault("kiln.root"), CmdlineFault::NotKeyValue);
    assert_eq!(fault("kiln.net="), CmdlineFault::EmptyValue);
    assert_eq!(fault("kiln.rot=root"), CmdlineFault::UnknownKey);
    assert_eq!(
        fault("kiln.vol=v,/a%2c"),
        CmdlineFault::Escape("%2c".into())
    );
    assert_eq!(
        fault("kiln.vol=v,/a%41"),
        CmdlineFault::Escape("%41".into())
    );
    assert_eq!(fault("kiln.vol=v,/é"), CmdlineFault::Unescaped(0xc3));
    assert_eq!(fault("kiln.vol=v,/%C3"), CmdlineFault::NotUtf8);
    assert_eq!(
        fault("kiln.net=10.0.2.15/24,x"),
        CmdlineFault::Address {
            what: "gateway",
            text: "x".into()
        }
    );
}

#[test]
fn the_encoder_refuses_what_the_guest_would() {
    let refused = |config: BootConfig, key: &str, fault: CmdlineFault| {
        let err = config.kernel_args().unwrap_err();
        assert_eq!((err.key, &err.fault), (key, &fault), "{err}");
        assert!(err
            .to_string()
            .starts_with(&format!("boot configuration kiln.{key}: ")));
    };
    let with = |change: fn(&mut BootConfig)| {
        let mut config = host_config();
        change(&mut config);
        config
    };
    refused(
        with(|c| c.hostname = "h".repeat(65)),
        "hostname",
        CmdlineFault::Hostname,
    );
    refused(
        with(|c| c.hostname = "a b".into()),
        "hostname",
        CmdlineFault::Hostname,
    );
    refused(with(|c| c.port = String::new()), "port", CmdlineFault::Port);
    refused(
        with(|c| c.upper = Upper::Disk(DiskRef::Serial("tmpfs".into()))),
        "upper",
        CmdlineFault::TmpfsSerial,
    );
    refused(
        with(|c| c.root = Some(DiskRef::Serial("root disk".into()))),
        "root",
        CmdlineFault::Disk("root disk".into()),
    );
    refused(
        with(|c| c.ident = Some(DiskRef::Path("/srv/ident".into()))),
        "ident",
        CmdlineFault::Disk("/srv/ident".into()),
    );
    refused(
        with(|c| c.net.as_mut().unwrap().prefix_len = 33),
        "net",
        CmdlineFault::PrefixLength("33".into()),
    );
    refused(
        with(|c| c.volumes[1].path = "/data".into()),
        "vol",
        CmdlineFault::DuplicateVolume,
    );
    refused(
        with(|c| c.volumes[0].tag = "vol,0".into()),
        "vol",
        CmdlineFault::Tag("vol,0".into()),
    );
    refused(
        with(|c| c.volumes[0].path = "/a/../b".into()),
        "vol",
        CmdlineFault::GuestPath("/a/../b".into()),
    );
}

fn name(max_len: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[A-Za-z0-9._-]{{1,{max_len}}}")).unwrap()
}

fn disk() -> impl Strategy<Value = DiskRef> {
    prop_oneof![
        name(20).prop_map(DiskRef::Serial),
        "[^\\x00]{1,12}".prop_map(|rest| DiskRef::Path(format!("/dev/{rest}"))),
    ]
}

fn upper() -> impl Strategy<Value = Upper> {
    prop_oneof![
        Just(Upper::Tmpfs),
        disk()
            .prop_filter("the tmpfs keyword", |d| *d
                != DiskRef::Serial("tmpfs".into()))
            .prop_map(Upper::Disk),
    ]
}

fn net() -> impl Strategy<Value = NetConfig> {
    let address = any::<u32>().prop_map(Ipv4Addr::from);
    (
        address.clone(),
        1u8..=32,
        proptest::option::of(address.clone()),
        proptest::option::of(address),
    )
        .prop_map(|(address, prefix_len, gateway, dns)| NetConfig {
            address,
            prefix_len,
            gateway,
            dns,
        })
}

/// Absolute, normalised paths of any characters but `/` and NUL.
fn guest_path() -> impl Strategy<Value = String> {
    let component = "[^/\\x00]{1,6}".prop_filter("not . or ..", |c| c != "." && c != "..");
    proptest::collection::vec(component, 1..4).prop_map(|cs| format!("/{}", cs.join("/")))
}

/// Volumes with distinct tags and paths.
fn volumes() -> impl Strategy<Value = Vec<VolumeMount>> {
    let one =
        (name(8), guest_path(), any::<bool>()).prop_map(|(tag, path, read_only)| VolumeMount {
            tag,
            path,
            read_only,
        });
    proptest::collection::vec(one, 0..4).prop_map(|candidates| {
        let mut volumes: Vec<VolumeMount> = Vec::new();
        for volume in candidates {
            if !volumes.iter().any(|v| volumes_clash(v, &volume)) {
                volumes.push(volume);
            }
        }
        volumes
    })
}

/// Tmpfs mounts at paths no volume of `volumes()` can have (they start with /t-).
fn tmpfs_mounts() -> impl Strategy<Value = Vec<TmpfsMount>> {
    let one = (0..4u32, 0..=0o7777u32, proptest::option::of(any::<u64>())).prop_map(
        |(index, mode, size_bytes)| TmpfsMount {
            path: format!("/t-{index}"),
            mode,
            size_bytes,
        },
    );
    proptest::collection::vec(one, 0..4).prop_map(|candidates| {
        let mut mounts: Vec<TmpfsMount> = Vec::new();
        for mount in candidates {
            if !mounts.iter().any(|m| m.path == mount.path) {
                mounts.push(mount);
            }
        }
        mounts
    })
}

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<u32>().prop_map(|a| IpAddr::from(Ipv4Addr::from(a))),
        any::<u128>().prop_map(|a| IpAddr::from(std::net::Ipv6Addr::from(a))),
    ]
}

fn hosts() -> impl Strategy<Value = Vec<HostEntry>> {
    let one =
        (name(MAX_HOSTNAME_LEN), ip()).prop_map(|(name, address)| HostEntry { name, address });
    proptest::collection::vec(one, 0..4)
}

fn config() -> impl Strategy<Value = BootConfig> {
    (
        proptest::option::of(disk()),
        proptest::option::of(disk()),
        upper(),
        name(12),
        name(MAX_HOSTNAME_LEN),
        proptest::option::of(net()),
        volumes().prop_map(|v| {
            v.into_iter()
                .filter(|v| !v.path.starts_with("/t-"))
                .collect::<Vec<_>>()
        }),
        tmpfs_mounts(),
        hosts(),
        proptest::collection::vec(ip(), 0..=MAX_DNS_SERVERS),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(
                root,
                ident,
                upper,
                port,
                hostname,
                net,
                volumes,
                tmpfs,
                hosts,
                dns,
                read_only,
                user_namespaces,
            )| BootConfig {
                root,
                ident,
                openshell: None,
                upper,
                port,
                hostname,
                net,
                volumes,
                tmpfs,
                hosts,
                dns,
                read_only,
                user_namespaces,
            },
        )
}

/// Kernel command lines with `kiln.*` arguments that are mostly well-formed, some not.
fn cmdline() -> impl Strategy<Value = String> {
    let address = "(1?[0-9]{1,2}\\.){3}1?[0-9]{1,2}";
    let disk = "[a-z0-9._-]{1,21}|/dev/[a-z0-9%]{0,6}|tmpfs";
    let arg = prop_oneof![
        disk.prop_map(|v| format!("kiln.root={v}")),
        disk.prop_map(|v| format!("kiln.ident={v}")),
        disk.prop_map(|v| format!("kiln.upper={v}")),
        "[A-Za-z0-9._-]{1,8}".prop_map(|v| format!("kiln.port={v}")),
        "[A-Za-z0-9._-]{60,66}|[A-Za-z0-9._-]{1,8}".prop_map(|v| format!("kiln.hostname={v}")),
        proptest::string::string_regex(&format!("{address}/[+0-9]{{1,2}}(,({address})?){{0,3}}"))
            .unwrap()
            .prop_map(|v| format!("kiln.net={v}")),
        "[a-z0-9]{1,2},(/([a-z.]{1,3}|%C3%A9|%2C|%2c|%20)){1,3}(,ro)?"
            .prop_map(|v| format!("kiln.vol={v}")),
        "on|off|yes|".prop_map(|v| format!("kiln.userns={v}")),
        "on|off|yes|".prop_map(|v| format!("kiln.ro={v}")),
        "/[a-z]{1,2},[0-9]{1,5}(,[0-9]{1,3})?".prop_map(|v| format!("kiln.tmpfs={v}")),
        "[a-z.]{1,3},((1?[0-9]{1,2}\\.){3}1?[0-9]{1,2}|[0-9a-f:]{2,8})"
            .prop_map(|v| format!("kiln.host={v}")),
        "(1?[0-9]{1,2}\\.){3}1?[0-9]{1,2}|[0-9a-f:]{2,8}".prop_map(|v| format!("kiln.dns={v}")),
        "kiln\\.[a-z]{0,8}(=[!-~]{0,8})?|console=ttyS0|\\PC{0,8}",
    ];
    proptest::collection::vec(arg, 0..6).prop_map(|args| args.join(" "))
}

proptest! {
    #[test]
    fn every_encodable_config_parses_back(config in config()) {
        let args = config.kernel_args().unwrap();
        for arg in &args {
            prop_assert!(arg.starts_with("kiln."), "{arg:?}");
            prop_assert!(
                arg.bytes().all(|b| b.is_ascii_graphic() && b != b'"'),
                "{arg:?} would not survive the kernel command line"
            );
        }
        let cmdline = format!("console=ttyS0 reboot=t {} panic=-1", args.join(" "));
        prop_assert_eq!(BootConfig::parse(&cmdline).unwrap(), config);
    }

    #[test]
    fn whatever_parses_encodes_to_the_same_config(cmdline in cmdline()) {
        if let Ok(config) = BootConfig::parse(&cmdline) {
            let args = config.kernel_args().unwrap();
            prop_assert_eq!(BootConfig::parse(&args.join(" ")).unwrap(), config);
        }
    }
}
