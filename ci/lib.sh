# Shared by the ci/ scripts: installs the Debian packages the workspace needs.

# Debian package that provides each command the tests and the build run.
declare -A PACKAGE_OF=(
  [protoc]=protobuf-compiler
  [etcd]=etcd-server
  [etcdctl]=etcd-client
  [redis-server]=redis-server
  [redis-cli]=redis-tools
  [openssl]=openssl
  [initdb]=postgresql
  [faketime]=faketime
  # The chaos suite builds its Redis clock-stepping preload library (clockshift.c).
  [cc]=gcc
)

step() {
  printf '\n==> %s\n' "$*"
}

# Debian puts the PostgreSQL server binaries in /usr/lib/postgresql/<version>/bin, off the
# PATH; leader-testkit looks there too.
have_postgres_binary() {
  compgen -G "/usr/lib/postgresql/*/bin/$1" >/dev/null
}

ensure_packages() {
  local missing=() cmd
  for cmd in "${!PACKAGE_OF[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || have_postgres_binary "$cmd" || missing+=("${PACKAGE_OF[$cmd]}")
  done
  # protoc alone lacks the well-known types etcd-client's protos import
  # (google/protobuf/descriptor.proto): they come with libprotobuf-dev.
  [ -f /usr/include/google/protobuf/descriptor.proto ] || missing+=(libprotobuf-dev)
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    step "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "missing: ${missing[*]}" >&2
    echo "install them with: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
}
