# tether_provision: lays one device's bundle into the image, for images
# built per device. In local.conf (or the image recipe):
#
#   IMAGE_CLASSES += "tether_provision"
#   TETHER_BUNDLE_DIR = "/path/to/bundles/SN-0042"
#
# TETHER_BUNDLE_DIR is one device's directory from `tether-edge provision`:
# credential, ca.crt and tetherd.toml. They land where tetherd.service looks
# for them: /etc/tether/credential (0600, owner tetherd), /etc/tether/ca.crt
# and /etc/tether/tetherd.toml (0644; it replaces the tetherd package's
# default config). The image needs tetherd in IMAGE_INSTALL.
#
# This runs at do_rootfs, after the packages are installed, and does what
# `tether-edge provision --root DIR` does to an image built once for all
# devices: the owner is looked up in the image's own /etc/passwd and set as
# numbers. Nothing of the bundle goes into a package, so the credential is
# never in a package feed or in the shared state cache; it is in the image
# and its rootfs work directory only, which are per device already.

TETHER_BUNDLE_DIR ??= ""
TETHER_BUNDLE_FILES = "credential ca.crt tetherd.toml"

def tether_bundle_files(d):
    """The bundle's files as do_rootfs[file-checksums] entries: a changed
    credential rebuilds the rootfs. Missing files are left to the check."""
    import os
    bundle = d.getVar("TETHER_BUNDLE_DIR")
    if not bundle:
        return ""
    paths = [os.path.join(bundle, f) for f in d.getVar("TETHER_BUNDLE_FILES").split()]
    return " ".join("%s:True" % p for p in paths if os.path.isfile(p))

python tether_provision_check() {
    import os
    import stat
    bundle = d.getVar("TETHER_BUNDLE_DIR")
    if not bundle:
        bb.fatal("tether_provision: TETHER_BUNDLE_DIR is not set: set it to one "
                 "device's bundle directory (tether-edge provision writes "
                 "OUT/SERIAL/{credential,ca.crt,tetherd.toml}), or remove "
                 "tether_provision from IMAGE_CLASSES for an image without a bundle")
    if not os.path.isdir(bundle):
        bb.fatal("tether_provision: TETHER_BUNDLE_DIR %s is not a directory" % bundle)
    missing = [f for f in d.getVar("TETHER_BUNDLE_FILES").split()
               if not os.path.isfile(os.path.join(bundle, f))]
    if missing:
        bb.fatal("tether_provision: %s lacks %s: a bundle has credential, ca.crt "
                 "and tetherd.toml" % (bundle, ", ".join(missing)))
    mode = os.stat(os.path.join(bundle, "credential")).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        bb.warn("tether_provision: %s/credential is readable by others on the build "
                "host (mode %o): it is a secret" % (bundle, stat.S_IMODE(mode)))
}
tether_provision_check[doc] = "Fails the image build when TETHER_BUNDLE_DIR or a file of the bundle is missing"
do_rootfs[prefuncs] += "tether_provision_check"
do_rootfs[vardeps] += "TETHER_BUNDLE_DIR TETHER_BUNDLE_FILES"
do_rootfs[file-checksums] += "${@tether_bundle_files(d)}"

tether_provision_rootfs() {
    passwd=${IMAGE_ROOTFS}${sysconfdir}/passwd
    uid=$(awk -F: '$1 == "tetherd" { print $3 }' "$passwd")
    gid=$(awk -F: '$1 == "tetherd" { print $4 }' "$passwd")
    if [ -z "$uid" ] || [ -z "$gid" ]; then
        bbfatal "tether_provision: the image has no user tetherd: add tetherd to IMAGE_INSTALL"
    fi
    install -d -m 0755 ${IMAGE_ROOTFS}${sysconfdir}/tether
    install -m 0600 -o "$uid" -g "$gid" ${TETHER_BUNDLE_DIR}/credential ${IMAGE_ROOTFS}${sysconfdir}/tether/credential
    install -m 0644 -o 0 -g 0 ${TETHER_BUNDLE_DIR}/ca.crt ${IMAGE_ROOTFS}${sysconfdir}/tether/ca.crt
    install -m 0644 -o 0 -g 0 ${TETHER_BUNDLE_DIR}/tetherd.toml ${IMAGE_ROOTFS}${sysconfdir}/tether/tetherd.toml
}
tether_provision_rootfs[doc] = "Installs the bundle into the rootfs, the credential owned by the image's tetherd user"
ROOTFS_POSTPROCESS_COMMAND += "tether_provision_rootfs"
