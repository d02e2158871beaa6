# The controller (`wisp serve`) as an image, for examples/kubernetes/controller.yaml. Build the
# binary first (`cargo build --release --bin wisp`), then, from the repo root:
#   podman build -t registry.example.com/wisp:dev -f image/Controller.Dockerfile .
# The binary links against glibc (SQLite is compiled in), hence a Debian base rather than scratch.
FROM debian:bookworm-slim
COPY target/release/wisp /usr/local/bin/wisp
USER 1000:1000
EXPOSE 8080 50000
ENTRYPOINT ["/usr/local/bin/wisp"]
CMD ["serve", "--data", "/var/lib/wisp", "--bind", "0.0.0.0"]
