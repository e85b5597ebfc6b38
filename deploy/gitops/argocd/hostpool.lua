-- Argo CD health of a covi HostPool (resource.customizations.health.covi.io_HostPool).
-- Healthy when at least one host is ready, Degraded when none is or failover is
-- paused by the mass-failure guard, Progressing until covi has observed the spec.
local hs = { status = "Progressing", message = "Waiting for covi" }
if obj.status == nil then return hs end
if obj.metadata.generation ~= nil and (obj.status.observedGeneration == nil or obj.status.observedGeneration < obj.metadata.generation) then
  return hs
end
if obj.status.conditions ~= nil then
  for _, c in ipairs(obj.status.conditions) do
    if c.type == "FailoverPaused" and c.status == "True" then
      hs.status = "Degraded"
      hs.message = c.message
      return hs
    end
    if c.type == "Ready" then
      hs.status = c.status == "True" and "Healthy" or "Degraded"
      hs.message = c.message
    end
  end
end
return hs
