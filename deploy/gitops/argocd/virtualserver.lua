-- Argo CD health of a covi VirtualServer (resource.customizations.health.covi.io_VirtualServer).
-- Progressing until covi has observed the current spec and the server is Ready; Degraded
-- when it failed (the reason and message of its Ready or Scheduled condition say why);
-- Suspended when runPolicy stopped it.
local hs = { status = "Progressing", message = "Waiting for covi to schedule and start the server" }
local function condition(t)
  if obj.status == nil or obj.status.conditions == nil then return nil end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == t then return c end
  end
  return nil
end
if obj.status == nil then return hs end
if obj.metadata.generation ~= nil and (obj.status.observedGeneration == nil or obj.status.observedGeneration < obj.metadata.generation) then
  hs.message = "Waiting for covi to observe generation " .. obj.metadata.generation
  return hs
end
local ready = condition("Ready")
local scheduled = condition("Scheduled")
if obj.status.phase == "Failed" then
  local c = ready ~= nil and ready.status == "False" and ready or scheduled
  hs.status = "Degraded"
  hs.message = c ~= nil and (c.reason .. ": " .. c.message) or "the server failed"
  return hs
end
if obj.status.phase == "Stopped" then
  hs.status = "Suspended"
  hs.message = "runPolicy is Stopped"
  return hs
end
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message
  return hs
end
if scheduled ~= nil and scheduled.status == "False" then
  hs.message = scheduled.reason .. ": " .. scheduled.message
end
return hs
