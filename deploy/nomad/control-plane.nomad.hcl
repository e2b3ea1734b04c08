# The infermesh control plane on Nomad: two replicas, sharing nothing but
# the config and the CA (Nomad Variables), registered in Consul as
# `infermesh-control-plane`, which sidecars dial by its Consul DNS name.
#
#   nomad var put nomad/jobs/infermesh-control-plane \
#     root_cert=@ca/root-cert.pem root_key=@ca/root-key.pem tokens=@tokens.yaml
#   cd deploy/nomad && nomad job run control-plane.nomad.hcl   # file() reads config/ from here
#
# (`infermesh-control-plane ca init --trust-domain cluster.local --out ca/`
# and `token create --tokens tokens.yaml ...` make those files.)
job "infermesh-control-plane" {
  type = "service"

  group "control-plane" {
    count = 2

    spread {
      attribute = "${node.unique.id}"
    }

    network {
      port "grpc" { static = 15012 }
      port "admin" { to = 15014 }
    }

    service {
      name     = "infermesh-control-plane"
      port     = "grpc"
      provider = "consul"
      check {
        type     = "http"
        port     = "admin"
        path     = "/ready"
        interval = "5s"
        timeout  = "2s"
      }
    }

    task "control-plane" {
      driver = "docker"
      user   = "1337:1337"

      config {
        image = "infermesh-control-plane:0.1.0"
        ports = ["grpc", "admin"]
        command = "infermesh-control-plane"
        args = [
          "serve",
          "--ca", "${NOMAD_SECRETS_DIR}/ca",
          "--tokens", "${NOMAD_SECRETS_DIR}/tokens.yaml",
          "--config-dir", "${NOMAD_TASK_DIR}/config",
          "--listen", "0.0.0.0:15012",
          "--admin", "0.0.0.0:15014",
        ]
        readonly_rootfs = true
        cap_drop        = ["all"]
      }

      # The CA and the join tokens' digests, from Nomad Variables.
      template {
        destination = "${NOMAD_SECRETS_DIR}/ca/root-cert.pem"
        data        = "{{ with nomadVar \"nomad/jobs/infermesh-control-plane\" }}{{ .root_cert }}{{ end }}"
      }
      template {
        destination = "${NOMAD_SECRETS_DIR}/ca/root-key.pem"
        perms       = "0600"
        data        = "{{ with nomadVar \"nomad/jobs/infermesh-control-plane\" }}{{ .root_key }}{{ end }}"
      }
      template {
        destination = "${NOMAD_SECRETS_DIR}/tokens.yaml"
        perms       = "0600"
        data        = "{{ with nomadVar \"nomad/jobs/infermesh-control-plane\" }}{{ .tokens }}{{ end }}"
      }
      # The mesh's config: deploy/nomad/config/mesh.yaml. Edit it and
      # `nomad job run` again; Nomad rewrites the file in place and the
      # control plane pushes the change (no restart).
      template {
        destination   = "${NOMAD_TASK_DIR}/config/mesh.yaml"
        change_mode   = "noop"
        data          = file("config/mesh.yaml")
      }

      resources {
        cpu    = 200
        memory = 256
      }
    }
  }
}
