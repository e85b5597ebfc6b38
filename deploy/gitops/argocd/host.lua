-- Argo CD health of a covi Host (resource.customizations.health.covi.io_Host).
-- Healthy when Ready, Degraded when lost or not ready, Suspended in maintenance or
-- cordoned, Progressing until its agent first reports.
local hs = { status = "Progressing", message = "Waiting for the host's covi-agent" }
if obj.spec ~= nil and (obj.spec.maintenance == true or obj.spec.unschedulable == true) then
  hs.status = "Suspended"
  hs.message = obj.spec.maintenance == true and "in maintenance" or "cordoned"
  return hs
end
if obj.status == nil or obj.status.conditions == nil then return hs end
for _, c in ipairs(obj.status.conditions) do
  if c.type == "Ready" then
    hs.status = c.status == "True" and "Healthy" or "Degraded"
    hs.message = c.reason .. ": " .. c.message
  end
end
return hs
