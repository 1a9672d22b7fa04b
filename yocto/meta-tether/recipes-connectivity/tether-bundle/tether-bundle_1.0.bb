SUMMARY = "One device's tether credential, edge CA and tetherd.toml"
DESCRIPTION = "Installs the bundle that tether-edge provision made for one \
               device (credential, ca.crt, tetherd.toml) into /etc/tether, \
               for images built per device. Set TETHER_BUNDLE_DIR to that \
               device's bundle directory."
HOMEPAGE = "https://example.invalid/tether"
BUGTRACKER = "https://example.invalid/tether/issues"
SECTION = "net"
LICENSE = "CLOSED"
CVE_PRODUCT = ""

# One device's bundle directory, e.g. bundles/SN-0042 from
# `tether-edge provision --out bundles`. The bundle is per device and
# secret: never share this package between images.
TETHER_BUNDLE_DIR ??= ""
FILESEXTRAPATHS:prepend := "${TETHER_BUNDLE_DIR}:"
SRC_URI = "file://credential file://ca.crt file://tetherd.toml"
# scarthgap unpacks into WORKDIR; wrynose sets UNPACKDIR itself.
UNPACKDIR ??= "${WORKDIR}"

inherit useradd

USERADD_PACKAGES = "${PN}"
USERADD_PARAM:${PN} = "--system --home-dir ${localstatedir}/lib/tetherd --no-create-home --shell /sbin/nologin --user-group tetherd"

python tether_bundle_check() {
    if not d.getVar("TETHER_BUNDLE_DIR"):
        bb.fatal("TETHER_BUNDLE_DIR is not set: point it at one device's bundle (tether-edge provision --out DIR makes DIR/SERIAL)")
}
tether_bundle_check[doc] = "Fails the build at once when TETHER_BUNDLE_DIR is unset"
do_fetch[prefuncs] += "tether_bundle_check"

do_install() {
    install -d -m 0755 ${D}${sysconfdir}/tether
    install -m 0600 -o tetherd -g tetherd ${UNPACKDIR}/credential ${D}${sysconfdir}/tether/credential
    install -m 0644 ${UNPACKDIR}/ca.crt ${D}${sysconfdir}/tether/ca.crt
    install -m 0644 ${UNPACKDIR}/tetherd.toml ${D}${sysconfdir}/tether/tetherd.toml
}

FILES:${PN} += "${sysconfdir}/tether/credential ${sysconfdir}/tether/ca.crt ${sysconfdir}/tether/tetherd.toml"
RDEPENDS:${PN} = "tetherd"
