# Shared by the scripts: sourced, not run.

# install_missing COMMAND:PACKAGE...: installs (apt-get) the Debian package of every command
# that is not on the PATH.
install_missing() {
  local missing=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "installing ${missing[*]} (apt-get)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

# install_oha: the load generator of the benchmark and the soak (cargo install, once).
install_oha() {
  export PATH="$HOME/.cargo/bin:$PATH"
  if ! command -v oha >/dev/null 2>&1; then
    echo "installing oha (cargo install, a few minutes once)"
    cargo install oha --locked --quiet
  fi
}
