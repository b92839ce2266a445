# Sourced by scripts/setup and scripts/check-newer-nix.
# The Debian mirror already configured for bookworm's binary packages, so that source packages and
# other suites come from the same place.
debian_mirror() {
  local uri
  uri=$(grep -hsE '^URIs:.*/debian/?$' /etc/apt/sources.list.d/*.sources | head -n1 | awk '{print $2}')
  [ -n "$uri" ] || uri=$(grep -hsE '^deb +[^ ]+/debian/? +bookworm' /etc/apt/sources.list | head -n1 | awk '{print $2}')
  echo "${uri:-http://deb.debian.org/debian}"
}
