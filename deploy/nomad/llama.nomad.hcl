# A model served in the mesh on Nomad: one allocation is one "pod" (a
# `bridge` network namespace shared by its tasks), with
#   - infermesh-init, a prestart task that installs the iptables rules
#     sending the allocation's TCP through the proxy, then exits;
#   - infermesh-proxy, a prestart sidecar task (it starts before the model
#     and runs beside it), fed by the control plane;
#   - the model server itself, unchanged.
# Its service is registered in Consul as `llama`; the gateway's Backend
# names `llama.service.consul:8000` (config/mesh.yaml), which the control
# plane resolves through Consul DNS and pushes as addresses.
#
#   nomad var put nomad/jobs/llama token=@llama.token trust_bundle=@ca/root-cert.pem
#   nomad job run deploy/nomad/llama.nomad.hcl
#
# (`infermesh-control-plane token create --tokens tokens.yaml --namespace
# models --service-account llama --out llama.token` makes the token.)
job "llama" {
  type = "service"

  group "llama" {
    count = 2

    network {
      mode = "bridge"
      port "http" { to = 8000 }
      port "health" { to = 15020 }
    }

    service {
      name     = "llama"
      port     = "http"
      provider = "consul"
      check {
        type     = "http"
        port     = "health"
        path     = "/ready"
        interval = "5s"
        timeout  = "2s"
      }
    }

    task "infermesh-init" {
      driver = "docker"
      lifecycle {
        hook    = "prestart"
        sidecar = false
      }
      config {
        image   = "infermesh-proxy:0.1.0"
        command = "infermesh-proxy"
        args    = ["init"]
        cap_add = ["net_admin", "net_raw"]
      }
      user = "0"
      resources {
        cpu    = 50
        memory = 32
      }
    }

    task "infermesh-proxy" {
      driver = "docker"
      user   = "1337:1337"
      lifecycle {
        hook    = "prestart"
        sidecar = true
      }
      config {
        image   = "infermesh-proxy:0.1.0"
        command = "infermesh-proxy"
        args = [
          "sidecar",
          "--control-plane", "infermesh-control-plane.service.consul:15012",
          "--credential", "${NOMAD_SECRETS_DIR}/token",
          "--trust-bundle", "${NOMAD_SECRETS_DIR}/trust-bundle.pem",
          "--node", "${NOMAD_ALLOC_ID}",
          "--label", "app=llama",
        ]
        readonly_rootfs = true
        cap_drop        = ["all"]
      }
      template {
        destination = "${NOMAD_SECRETS_DIR}/token"
        perms       = "0600"
        data        = "{{ with nomadVar \"nomad/jobs/llama\" }}{{ .token }}{{ end }}"
      }
      template {
        destination = "${NOMAD_SECRETS_DIR}/trust-bundle.pem"
        data        = "{{ with nomadVar \"nomad/jobs/llama\" }}{{ .trust_bundle }}{{ end }}"
      }
      resources {
        cpu    = 100
        memory = 64
      }
    }

    task "model" {
      driver = "docker"
      config {
        # Any model server; the mock one answers OpenAI's API on 8000.
        image   = "infermesh-bench:0.1.0"
        command = "infermesh-bench"
        args    = ["serve", "--listen", "0.0.0.0:8000", "--model", "mock-llm"]
      }
      resources {
        cpu    = 500
        memory = 512
      }
    }
  }
}
