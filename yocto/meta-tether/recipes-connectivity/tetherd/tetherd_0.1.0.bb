SUMMARY = "tether device daemon: publishes local services through an outbound TLS tunnel"
DESCRIPTION = "tetherd dials a tether edge over TLS 1.3, authenticates with \
               the device's token and carries the streams the edge opens to \
               local upstreams. It runs under systemd (Type=notify, watchdog) \
               as the static user tetherd."
HOMEPAGE = "https://example.invalid/tether"
BUGTRACKER = "https://example.invalid/tether/issues"
SECTION = "net"
CVE_PRODUCT = "tether"
LICENSE = "Apache-2.0"
# The workspace's license field (Cargo.toml, line 12).
LIC_FILES_CHKSUM = "file://Cargo.toml;beginline=12;endline=12;md5=2507bd5f0713f05419cd2f22fa06fe62"

# Point TETHER_GIT_URI and SRCREV at your mirror of the repository.
TETHER_GIT_URI ??= "git://example.invalid/tether.git;protocol=https;branch=main"
SRC_URI = "${TETHER_GIT_URI}"
SRCREV = "eb3b651507e93f82b032b5d9fc537159d0fb4cea"

# The crate list, checksummed, generated from Cargo.lock by
# scripts/yocto-crates (scripts/test fails when it is stale). With it the
# cargo class builds offline: do_compile never touches the network.
require ${BPN}-crates.inc

inherit cargo cargo-update-recipe-crates systemd useradd

# Build only the daemon of the workspace. The cargo class builds with
# --release (the workspace's plain release profile, unstripped: Yocto strips
# and splits the debug info itself; `--profile min` strips, which INSANE's
# already-stripped check refuses) and --frozen against the vendored crates.
CARGO_BUILD_FLAGS:append = " -p tetherd"

USERADD_PACKAGES = "${PN}"
USERADD_PARAM:${PN} = "--system --home-dir ${localstatedir}/lib/tetherd --no-create-home --shell /sbin/nologin --user-group tetherd"

SYSTEMD_SERVICE:${PN} = "tetherd.service"
SYSTEMD_AUTO_ENABLE:${PN} = "enable"

do_install:append() {
    install -d ${D}${systemd_system_unitdir} ${D}${nonarch_libdir}/sysusers.d ${D}${nonarch_libdir}/tmpfiles.d ${D}${sysconfdir}/tether
    install -m 0644 ${S}/systemd/tetherd.service ${D}${systemd_system_unitdir}/tetherd.service
    install -m 0644 ${S}/systemd/sysusers.d/tetherd.conf ${D}${nonarch_libdir}/sysusers.d/tetherd.conf
    install -m 0644 ${S}/systemd/tmpfiles.d/tetherd.conf ${D}${nonarch_libdir}/tmpfiles.d/tetherd.conf
    install -m 0644 ${S}/systemd/tetherd.toml ${D}${sysconfdir}/tether/tetherd.toml
}

FILES:${PN} += "${nonarch_libdir}/sysusers.d/tetherd.conf ${nonarch_libdir}/tmpfiles.d/tetherd.conf"
CONFFILES:${PN} = "${sysconfdir}/tether/tetherd.toml"
